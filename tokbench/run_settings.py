"""The result-defining settings of each run, read from its manifest, so reports never pool runs that
differ in one without saying so.

A run's settings are its manifest ``config`` (what changes predictions: limit, dtype, attention,
max_pixels, random weights, max_new_tokens, task version, method arguments, ...) and ``settings``
(batch size, warm-up, processes, judge), flattened to dotted keys (``method_args.k``,
``judge.model``). Every key falls in one class:

- identity (``model``, ``method``, ``task``, ``ratio``, ``budget``, ``budget_label``): the report's
  own grouping columns;
- ``POOLED`` (``seed``): replicate runs of one cell are pooled on purpose; the row lists them;
- ``IGNORED``: where files went, not what was measured (``output``, ``data_dir``, ``save_masks``,
  the judge's key variable, concurrency and retries);
- ``METHOD``-specific (``method_config.*``, ``method_args.*``, ``position_policy``): differ between
  methods by design, so they split a row only when they differ within it;
- ``TIMING`` (``batch_size``, ``warmup``, ``processes``): change times, not predictions;
- everything else, including keys this module does not know yet: changes what is measured.

A report row splits on every non-identity, non-pooled key that differs between runs of one row, and
on every non-method key that differs between runs of one (model, task): a method row and the ``full``
row it is compared with then show where their settings differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokbench.store import MANIFEST, Manifest

IDENTITY = ("model", "method", "task", "ratio", "budget", "budget_label")
POOLED = ("seed",)
IGNORED = ("output", "data_dir", "save_masks", "judge.key_env", "judge.concurrency", "judge.retries")
METHOD_PREFIXES = ("method_config", "method_args", "position_policy")
TIMING = ("batch_size", "warmup", "processes")
DEFAULTS = {"processes": 1, "warmup": 0, "batch_size": 1}  # what a manifest without the key ran with


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True) if value else None
    return {prefix: value} if prefix else {}


def read(run_dir: str | Path) -> dict[str, Any]:
    """The run's settings (flattened, identity and ignored keys dropped); {} without a manifest."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {}
    manifest = Manifest.from_file(path)
    flat = {**DEFAULTS, **_flatten(manifest.config), **_flatten(manifest.settings)}
    return {k: v for k, v in flat.items() if k not in IDENTITY and k not in IGNORED}


def is_method_specific(key: str) -> bool:
    return key.split(".")[0] in METHOD_PREFIXES


def split_keys(settings: dict[str, dict[str, Any]], cells: dict[str, tuple], scopes: dict[str, tuple]) -> list[str]:
    """Keys that split rows. ``settings``: run → settings; ``cells``: run → its row key;
    ``scopes``: run → its (model, task) key. Sorted: measured, timing, then method-specific keys."""
    keys = sorted({k for s in settings.values() for k in s} - set(POOLED))
    split = []
    for key in keys:
        groups = cells if is_method_specific(key) else scopes
        values: dict[tuple, set[str]] = {}
        for run, group in groups.items():
            values.setdefault(group, set()).add(label_value(settings[run].get(key)))
        if any(len(v) > 1 for v in values.values()):
            split.append(key)
    return sorted(split, key=lambda k: (is_method_specific(k), k in TIMING, k))


def label_value(value: Any) -> str:
    return "—" if value is None else str(value)


def label(values: Iterable[tuple[str, Any]]) -> str:
    """'batch_size=10, limit=60'."""
    return ", ".join(f"{key}={label_value(value)}" for key, value in values)
