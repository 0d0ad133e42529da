"""Model loading: alias or hub id or local path -> a `ModelAdapter` for its family."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from pathlib import Path

from tokbench.models.base import ModelAdapter

_FAMILIES = {"qwen2_5_vl": "tokbench.models.qwen2_5_vl:Qwen25VLAdapter", "llava": "tokbench.models.llava:LlavaAdapter"}


class ModelError(ValueError):
    """An unknown alias, a missing path, or an unsupported architecture."""


def resolve_model(name: str, aliases: dict[str, str]) -> str:
    """Alias -> its target; a hub id (``org/name``) or existing path passes through."""
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


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32") from None


def pick_attention(requested: str, device: str) -> str:
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
) -> ModelAdapter:
    """Load ``name`` (alias, hub id or local path) with ``from_pretrained`` and wrap it in its adapter.

    ``random_weights``: instantiate the real architecture from the shipped config instead (see
    `tokbench.models.random_weights`); ``max_pixels`` caps Qwen2.5-VL's dynamic resolution there.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    target = resolve_model(name, aliases)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if random_weights:
        from tokbench.models.random_weights import build_random, config_name

        model, processor = build_random(
            config_name(name, target), pick_dtype(dtype, device), pick_attention(attn_implementation, device),
            device, max_pixels,
        )
        return _adapter(model, processor, name)
    if target.startswith("tiny:"):
        from tokbench.models.tiny import ensure_tiny

        target = str(ensure_tiny(target.removeprefix("tiny:")))
    try:
        config = AutoConfig.from_pretrained(target)
    except OSError as err:
        raise ModelError(
            f"cannot load model {target!r}: not a local checkpoint and not in the HF cache ({err.__class__.__name__}); "
            "download it first or pass a local path"
        ) from None
    family = config.model_type
    if family not in _FAMILIES:
        raise ModelError(f"model {target!r} is a {family!r}; supported: {', '.join(_FAMILIES)}")
    model = AutoModelForImageTextToText.from_pretrained(
        target,
        dtype=pick_dtype(dtype, device),
        attn_implementation=pick_attention(attn_implementation, device),
        device_map=device,
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(target)
    if max_pixels is not None and family == "qwen2_5_vl":
        processor.image_processor.size["longest_edge"] = max_pixels
    return _adapter(model, processor, name)


def _adapter(model, processor, name: str) -> ModelAdapter:
    module_name, _, cls_name = _FAMILIES[model.config.model_type].partition(":")
    adapter_cls = getattr(importlib.import_module(module_name), cls_name)
    return adapter_cls(model, processor, name)

