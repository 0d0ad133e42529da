"""Checks on a method's own weights directory (GlimpsePrune's glimpse modules), as one-line `MethodError`s.

A method with trained parts loads them when its stages are built, which `tokbench.runner.validate`
does from the model's config before the model loads; these checks make a missing or corrupt file
fail there with its path and a fix, instead of deep inside ``torch.load`` after the model load.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from tokbench.pruner import MethodError


def check_weights_dir(
    directory: Path, method: str, weights: str, keys: tuple[str, ...], config: str = "config.json"
) -> None:
    """``directory`` must hold ``config`` (a JSON object) and ``weights`` (a ``torch.save``d dict with
    ``keys``, loadable with ``weights_only=True``); raises `MethodError` naming the file otherwise."""
    import torch

    fix = f"pass --method-arg weights=DIR (a directory with {config} and {weights})"
    if not directory.is_dir():
        raise MethodError(f"{method}: weights directory {directory} does not exist; {fix}")
    config_path, weights_path = directory / config, directory / weights
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MethodError(f"{method}: {path} is missing; {fix}")
    try:
        settings = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MethodError(f"{method}: {config_path} is not valid JSON ({_first_line(err)}); {fix}") from None
    if not isinstance(settings, dict):
        raise MethodError(f"{method}: {config_path} must hold a JSON object; {fix}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        reason = f"{type(err).__name__}: {_first_line(err)}"[:200]
        raise MethodError(f"{method}: cannot load {weights_path} with torch.load(weights_only=True) ({reason}); {fix}") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise MethodError(f"{method}: {weights_path} lacks {', '.join(missing)}; {fix}")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
