"""Peak memory of every vision-stage and in-LLM method as the visual-token count grows (measured, not
estimated): ``tokbench bench --memory``.

For each method and each token count ``n`` (a square noise image of ``sqrt(n)`` x ``sqrt(n)`` tokens),
one ``generate`` call (one new token) is measured: on CUDA the allocator peak
(``torch.cuda.max_memory_allocated`` after a reset) minus what was allocated before the call (weights);
on CPU the live-tensor peak (`tokbench.metrics.LiveTensorPeak`: every tensor created during the call).
A method whose selection builds an ``n x n`` map anywhere grows 4x per doubling of ``n``; linear work
grows 2x. Pre-LLM methods get a fixed count budget (their merge/scan temporaries are then ``O(n·k)``,
linear), in-LLM methods a fixed ratio (they keep a fraction of ``n`` through the layers).

On CPU the model is a narrow Qwen2.5-VL whose vision tower has the real depth and attention pattern
(32 blocks, full attention in blocks 7/15/23/31, 112 px windows) and a 4-layer LLM
(`deep_tower_qwen`), so the tower and every stage run at real sequence lengths in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokbench.engine import Engine
from tokbench.metrics import call_peak_mb
from tokbench.models.base import ModelAdapter
from tokbench.overhead import SHALLOW_LLM_ARGS
from tokbench.pruner import Budget, Stage, build_method, method_names

PRE_LLM_BUDGET = 64  # visual tokens kept by vision/embed-stage methods at every n
IN_LLM_RATIO = 0.5  # layer-average retention of in-LLM methods (reachable on a 4-layer LLM)


def deep_tower_qwen(max_tokens: int = 16384) -> ModelAdapter:
    """A narrow Qwen2.5-VL (random weights, float32, SDPA, CPU) with the real vision-tower depth.

    The processor accepts images of up to ``max_tokens`` merged visual tokens.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tokbench.models.families.qwen2_5_vl import Qwen25VLAdapter
    from tokbench.models.tiny import qwen_processor, qwen_token_ids

    processor, ids = qwen_processor(max_pixels=max_tokens * 28 * 28)
    special = qwen_token_ids(ids)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(processor.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_tokens + 1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3]},
            eos_token_id=special["eos_token_id"], pad_token_id=special["pad_token_id"],
        ),
        vision_config=dict(
            depth=32, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        ),
        attn_implementation="sdpa",
        **special,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.generation_config.pad_token_id = special["pad_token_id"]
    return Qwen25VLAdapter(model, processor, "deep-tower-qwen")


def scaling_methods(adapter: ModelAdapter) -> list[str]:
    """Registered methods with a vision, glimpse or LLM stage (embed-stage methods such as DivPrune and
    CDPruner compare every pair of tokens by design and are left out)."""
    names = []
    for name in method_names():
        method = _build(name, adapter)
        if method is not None and any(s.stage in (Stage.VISION, Stage.LLM, Stage.GLIMPSE) for s in method.stages(adapter.info())):
            names.append(name)
    return names


def _build(name: str, adapter: ModelAdapter):
    args = SHALLOW_LLM_ARGS.get(name, {}) if adapter.n_layers <= 4 else {}
    if name == "glimpseprune":  # the VIP's memory does not depend on its weights' values
        args = {**args, "allow_untrained": "true"}
    try:
        probe = build_method(name, Budget.ratio(IN_LLM_RATIO), args)
    except ValueError:
        return None
    pre_llm = all(s.stage in (Stage.VISION, Stage.EMBED, Stage.INPUT) for s in probe.stages(adapter.info()))
    return build_method(name, Budget.tokens(PRE_LLM_BUDGET), args) if pre_llm else probe


def peak_mb(adapter: ModelAdapter, method, n_tokens: int) -> float:
    """Peak memory (MB) of one ``generate`` call of ``method`` on a ``sqrt(n)`` x ``sqrt(n)``-token image."""
    side = math.isqrt(n_tokens) * 28
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    engine = Engine(adapter, method)

    def call() -> None:
        engine.generate([[image]], ["What colour is the square?"], [0], max_new_tokens=1)

    if adapter.device.type == "cuda":
        call()  # warm-up: kernels and caches the allocator keeps are not the method's
    return call_peak_mb(adapter.device, call)


def measure(
    adapter: ModelAdapter, methods: Iterable[str], token_counts: Iterable[int], echo=print
) -> dict[str, dict[int, float]]:
    """``{method: {n: peak MB}}`` for every method (incl. ``full``) and token count; a method whose
    settings this model cannot run is left out with one line."""
    results: dict[str, dict[int, float]] = {}
    for name in ["full", *methods]:
        method = _build(name, adapter)
        try:
            results[name] = {n: peak_mb(adapter, method, n) for n in token_counts}
        except ValueError as err:
            echo(f"{name}: skipped ({err})")
    return results


def growth(peaks: dict[int, float]) -> float:
    """The largest peak ratio between consecutive token counts, per doubling of n (2.0 = linear)."""
    counts = sorted(peaks)
    return max(
        (peaks[b] / peaks[a]) ** (1 / math.log2(b / a)) for a, b in zip(counts, counts[1:])
    )


def report(results: dict[str, dict[int, float]], echo=print) -> None:
    counts = sorted(next(iter(results.values())))
    echo(f"{'method':<14}" + "".join(f"{f'{n} tok (MB)':>14}" for n in counts) + f"{'x per 2x n':>12}")
    for name, peaks in results.items():
        echo(f"{name:<14}" + "".join(f"{peaks[n]:>14.1f}" for n in counts) + f"{growth(peaks):>12.2f}")


def run(model: str | None, token_counts: list[int], random_weights: bool = False, echo=print) -> dict[str, Any]:
    """``tokbench bench --memory``: ``model`` (alias, hub id or path; ``random_weights`` for the shipped
    real-size configs), or None for `deep_tower_qwen` on CPU."""
    if model is None:
        adapter = deep_tower_qwen(max(token_counts))
    else:
        from tokbench.config import load_config
        from tokbench.models import load_model

        adapter = load_model(model, load_config().models, random_weights=random_weights,
                             max_pixels=max(token_counts) * 28 * 28)  # fmt: skip
    results = measure(adapter, scaling_methods(adapter), token_counts, echo)
    where = "CUDA allocator peak - weights" if adapter.device.type == "cuda" else "live-tensor peak, weights excluded"
    echo(f"peak memory per generate call ({where}); model {adapter.name}")
    report(results, echo)
    return results
