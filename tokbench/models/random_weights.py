"""Real-size architectures with random weights, for efficiency numbers without downloads.

The shipped configs (`configs/*.json`) hold the architecture fields of the released checkpoints; the
model is instantiated directly on the target device in the target dtype (no CPU-side materialisation of
the full model). Cost (TTFT, FLOPs, memory) depends only on shapes, so these numbers are real; accuracy
is meaningless. The tokenizer is the offline byte-level one (special token ids remapped), so prompts
tokenise to somewhat more text tokens than the real tokenizer gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"

def _hub_ids() -> dict[str, str]:
    """Hub id -> shipped config name, from every family's ``hub_configs``."""
    from tokbench.models import adapter_class, family_names

    return {hub: key for family in family_names() for hub, key in adapter_class(family).hub_configs.items()}


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def config_name(name: str, target: str) -> str:
    """The shipped config for an alias or hub id; raises with the list when there is none."""
    hub_ids = _hub_ids()
    for candidate in (name, hub_ids.get(target, ""), hub_ids.get(name, "")):
        if candidate and (CONFIG_DIR / f"{candidate}.json").exists():
            return candidate
    raise ValueError(f"no shipped config for {name!r} with --random-weights; available: {', '.join(shipped_configs())}")


def shipped_spec(config_key: str) -> tuple[str, dict]:
    """(model_type, config kwargs) of shipped config ``config_key``."""
    spec = json.loads((CONFIG_DIR / f"{config_key}.json").read_text())
    spec.pop("_source", None)
    return spec.pop("model_type"), spec


def build_random(
    config_key: str, dtype: torch.dtype, attn: str, device: str, max_pixels: int | None = None, device_map=None
):
    """(model, processor) of the real architecture ``config_key`` with random weights on ``device``
    (with ``device_map``, the layers spread as accelerate's ``infer_auto_device_map`` places them)."""
    from transformers import AutoModelForImageTextToText

    from tokbench.models import adapter_class, resolve_device_map

    model_type, spec = shipped_spec(config_key)
    config, processor = adapter_class(model_type).random_parts(spec, max_pixels)
    text = config.get_text_config()
    text.eos_token_id, text.pad_token_id = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    placement = resolve_device_map(device_map, device)
    if isinstance(placement, str) and placement == device:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = _dispatched(config, dtype, attn, placement)
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    return model.eval(), processor


def _dispatched(config, dtype: torch.dtype, attn: str, placement):
    """The model built on the meta device, its weights materialised randomly where ``placement`` (a
    device map, or auto/balanced/sequential) puts them, with accelerate's dispatch hooks."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    if isinstance(placement, str):
        placement = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=dtype)
    model.to_empty(device="cpu")
    model.init_weights()
    return dispatch_model(model, device_map=placement)
