"""Model loading: alias or hub id or local path -> a `ModelAdapter` for its family.

Families are discovered, not listed: ``tokbench/models/families/<model_type>.py`` serves checkpoints whose
``config.model_type`` is ``<model_type>`` through its ``ADAPTER`` class.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from pathlib import Path

from tokbench.models.base import ModelAdapter

FAMILY_DIR = Path(__file__).resolve().parent / "families"


class ModelError(ValueError):
    """An unknown alias, a missing path, or an unsupported architecture."""


def family_names() -> list[str]:
    """The ``model_type`` of every supported family (one adapter module each)."""
    return sorted(p.stem for p in FAMILY_DIR.glob("*.py") if not p.stem.startswith("_"))


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class serving ``model_type``; ModelError for an unsupported one."""
    if model_type not in family_names():
        raise ModelError(f"unsupported model type {model_type!r}; supported: {', '.join(family_names())}")
    return importlib.import_module(f"tokbench.models.families.{model_type}").ADAPTER


def resolve_model(name: str, aliases: dict[str, str]) -> str:
    """Alias -> its target; a hub id (``org/name``) or existing path passes through."""
    if not name.strip():
        raise ModelError(f"--model is empty; pass an alias ({', '.join(sorted(aliases))}), a hub id or a local path")
    if name in aliases:
        return aliases[name]
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        close = difflib.get_close_matches(name, aliases, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(
            f"unknown model {name!r}: not an alias, a hub id (org/name) or an existing path; {hint}"
            f"aliases: {', '.join(sorted(aliases))}"
        )
    return name


DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")  # the ones the engine builds masks for
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def check_load_options(dtype: str, attn_implementation: str) -> None:
    """Refuse a dtype or attention implementation the loader or the engine cannot use (ModelError)."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)} (--dtype)")
    if attn_implementation not in ATTENTION:
        raise ModelError(f"unknown attention implementation {attn_implementation!r}; use {', '.join(ATTENTION)} (--attn)")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("--attn flash_attention_2 needs the flash-attn package, which is not installed; pass --attn sdpa")


def check_checkpoint_dir(path: Path) -> None:
    """A local model directory must hold ``config.json`` and weights (ModelError naming what is missing)."""
    if not (path / "config.json").is_file():
        raise ModelError(f"model dir {path} has no config.json; pass a checkpoint directory (config.json + weights)")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ModelError(f"model dir {path} has no weights (*.safetensors or *.bin); pass a complete checkpoint directory")


def pick_dtype(dtype: str, device: str):
    import torch

    check_load_options(dtype, "auto")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def pick_attention(requested: str, device: str) -> str:
    check_load_options("auto", requested)
    if requested != "auto":
        return requested
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(
    name: str,
    aliases: dict[str, str],
    dtype: str = "auto",
    attn_implementation: str = "auto",
    device: str | None = None,
    random_weights: bool = False,
    max_pixels: int | None = None,
    device_map: str | None = None,
) -> ModelAdapter:
    """Load ``name`` (alias, hub id or local path) with ``from_pretrained`` and wrap it in its adapter.

    ``random_weights``: instantiate the real architecture from the shipped config instead (see
    `tokbench.models.random_weights`); ``max_pixels`` caps dynamic resolution (families that have it);
    ``device_map``: ``"auto"`` spreads the layers over every visible GPU (then CPU) with accelerate's
    big-model dispatch, or a JSON file mapping module names to devices; default: all on ``device``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    target = resolve_model(name, aliases)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if random_weights:
        from tokbench.models.random_weights import build_random, config_name

        model, processor = build_random(
            config_name(name, target), pick_dtype(dtype, device), pick_attention(attn_implementation, device),
            device, max_pixels, device_map,
        )
        return adapter_class(model.config.model_type)(model, processor, name)
    if target.startswith("tiny:"):
        from tokbench.models.tiny import ensure_tiny

        target = str(ensure_tiny(target.removeprefix("tiny:")))
    if Path(target).is_dir():
        check_checkpoint_dir(Path(target))
    try:
        config = AutoConfig.from_pretrained(target)
    except OSError as err:
        raise ModelError(
            f"cannot load model {target!r}: not a local checkpoint and not in the HF cache ({err.__class__.__name__}); "
            "download it first or pass a local path"
        ) from None
    if config.model_type not in family_names():
        raise ModelError(f"model {target!r} is a {config.model_type!r}; supported: {', '.join(family_names())}")
    model = AutoModelForImageTextToText.from_pretrained(
        target,
        dtype=pick_dtype(dtype, device),
        attn_implementation=pick_attention(attn_implementation, device),
        device_map=resolve_device_map(device_map, device),
    )
    model.eval()
    adapter = adapter_class(config.model_type)(model, AutoProcessor.from_pretrained(target), name)
    adapter.configure_processor(max_pixels)
    return adapter


def resolve_device_map(device_map: str | None, device: str):
    """``--device-map``: None -> everything on ``device``; ``"auto"`` -> accelerate's dispatch over every
    visible device; a path -> the JSON ``{module name: device}`` it holds (ModelError if unreadable)."""
    if device_map is None:
        return device
    if device_map in ("auto", "balanced", "sequential"):
        return device_map
    import json

    try:
        mapping = json.loads(Path(device_map).read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"--device-map {device_map!r}: not auto/balanced/sequential and not a readable JSON file ({err})") from None
    if not isinstance(mapping, dict):
        raise ModelError(f"--device-map {device_map}: the JSON must map module names to devices")
    return mapping

