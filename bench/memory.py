"""Peak GPU memory per method at high resolution, estimated from shapes (no GPU, no weights needed).

For Qwen2.5-VL (the shipped real-size config) and a page of W x H pixels at the processor's default
pixel limit, prints the patch count P (vision tower), the merged visual tokens N (LLM), and per method:
weights + vision-tower and LLM-prefill activations + KV cache + the method's largest selection
temporary. Selection temporaries are what differ:

- tokbench's vision-attention statistics (VisionZip, VScan) are computed ``chunk`` queries at a time
  (``tokbench.attention.attention_received``): 2 x heads x chunk x P float32;
- the official Qwen2.5-VL ports of VisionZip and VScan materialise the full attention map of a
  full-attention block: heads x P x P float32 (shown as "official port");
- DivPrune / CDPruner build N x N similarity matrices (float32; CDPruner also its kernel);
- in-LLM methods (FastV, PyramidDrop, GlimpsePrune) recompute one attention row: heads x L float32.

Activations are rough upper bounds (3 live MLP-width tensors per layer in bf16); the point is the
order of magnitude against an 80 GB GPU. Measure on a GPU with ``tokbench run --random-weights``.

    python bench/memory.py --size 2480x3508 --model qwen2.5-vl-7b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 1024**3
CONFIGS = Path(__file__).resolve().parent.parent / "tokbench" / "models" / "configs"


def estimate(config: dict, n_params: float, width: int, height: int, max_pixels: int, chunk: int = 1024) -> dict:
    """Bytes per method (and the official ports' full map) for one image; see the module docstring."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    vision, text = config["vision_config"], config.get("text_config", config)
    h, w = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=max_pixels)
    patches = (h // 14) * (w // 14)
    tokens = patches // 4
    seq = tokens + 64  # plus a short prompt
    heads_v, heads = vision["num_heads"], text["num_attention_heads"]
    head_dim = text["hidden_size"] // heads
    base = {
        "weights": n_params * 2,
        "vision_act": patches * vision["intermediate_size"] * 2 * 3,
        "llm_act": seq * text["intermediate_size"] * 2 * 3,
        "kv_cache": text["num_hidden_layers"] * 2 * seq * text["num_key_value_heads"] * head_dim * 2,
    }
    selection = {
        "full / random / pool": 0,
        "fastv / pyramiddrop / glimpseprune": 2 * heads * seq * 4,
        "visionzip / vscan (tokbench)": 2 * heads_v * min(chunk, patches) * patches * 4,
        "divprune": 2 * tokens * tokens * 4,
        "cdpruner": 3 * tokens * tokens * 4,
        "visionzip / vscan (official port)": 2 * heads_v * patches * patches * 4,
    }
    fixed = sum(base.values())
    return {"grid": (h, w), "patches": patches, "tokens": tokens, "base": base, "peak": {k: fixed + v for k, v in selection.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-vl-7b", choices=["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
    parser.add_argument("--size", default="2480x3508", help="image W x H (default: an A4 page at 300 dpi)")
    parser.add_argument("--max-pixels", type=int, default=12845056, help="the processor's default limit")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    args = parser.parse_args()
    config = json.loads((CONFIGS / f"{args.model}.json").read_text())
    n_params = {"qwen2.5-vl-3b": 3.75e9, "qwen2.5-vl-7b": 8.29e9}[args.model]  # counted from the configs
    width, height = map(int, args.size.split("x"))
    result = estimate(config, n_params, width, height, args.max_pixels)
    base = ", ".join(f"{k} {v / GB:.1f}" for k, v in result["base"].items())
    print(f"{args.model}, image {args.size} -> resized {result['grid'][1]}x{result['grid'][0]}: "
          f"{result['patches']} patches, {result['tokens']} visual tokens (estimate, GB: {base})")  # fmt: skip
    print(f"{'method':<38} {'peak GB':>9}  fits {args.gpu_gb:.0f} GB")
    for name, peak in result["peak"].items():
        print(f"{name:<38} {peak / GB:>9.1f}  {'yes' if peak / GB < args.gpu_gb else 'NO'}")


if __name__ == "__main__":
    main()
