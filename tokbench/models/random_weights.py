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

# hub ids -> shipped config names
_HUB_IDS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b",
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
}


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def config_name(name: str, target: str) -> str:
    """The shipped config for an alias or hub id; raises with the list when there is none."""
    for candidate in (name, _HUB_IDS.get(target, ""), _HUB_IDS.get(name, "")):
        if candidate and (CONFIG_DIR / f"{candidate}.json").exists():
            return candidate
    raise ValueError(f"no shipped config for {name!r} with --random-weights; available: {', '.join(shipped_configs())}")


def build_random(config_key: str, dtype: torch.dtype, attn: str, device: str, max_pixels: int | None = None):
    """(model, processor) of the real architecture ``config_key`` with random weights on ``device``."""
    from transformers import AutoModelForImageTextToText, LlavaConfig, Qwen2_5_VLConfig

    from tokbench.models import tiny

    spec = json.loads((CONFIG_DIR / f"{config_key}.json").read_text())
    spec.pop("_source", None)
    family = spec.pop("model_type")
    if family == "qwen2_5_vl":
        processor, ids = tiny.qwen_processor(max_pixels=max_pixels or 12845056)
        config = Qwen2_5_VLConfig(**spec, **tiny.qwen_token_ids(ids))
        eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    else:
        vision = spec["vision_config"]
        processor, ids = tiny.llava_processor(vision["image_size"], vision["patch_size"])
        config = LlavaConfig(**spec, **tiny.llava_token_ids(ids))
        eos, pad = ids["</s>"], ids["<pad>"]
    config.get_text_config().eos_token_id = eos
    config.get_text_config().pad_token_id = pad
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model.eval(), processor
