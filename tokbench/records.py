"""The efficiency half of a result row, from one engine sample: the one place each figure is computed."""

from __future__ import annotations

from typing import Any

from tokbench.engine import BatchOutput, SampleOutput
from tokbench.metrics import LLMShape, PeakMemory, kv_cache_mb, prefill_flops, retention_figures


def efficiency_fields(
    sample: SampleOutput,
    batch: BatchOutput,
    memory: PeakMemory,
    shape: LLMShape,
    headline: str,
    bytes_per_elem: int,
) -> dict[str, Any]:
    """Counts, retention, FLOPs ratio, timings and memory for one sample (DESIGN.md results schema).

    Timings are the batch's (TTFT is measured per batch and reported on each of its samples).
    """
    n_text = sample.seq_len_per_layer[0] - sample.kept_per_layer[0]
    unpruned = [n_text + sample.n_visual] * len(sample.seq_len_per_layer)
    timings = batch.timings_ms
    return {
        "n_visual": sample.n_visual,
        "n_kept_input": sample.n_kept_input,
        "kept_per_layer": sample.kept_per_layer,
        **retention_figures(sample.n_visual, sample.n_kept_input, sample.kept_per_layer, headline),
        "flops_ratio": prefill_flops(shape, sample.seq_len_per_layer) / prefill_flops(shape, unpruned),
        "ttft_ms": timings["ttft"],
        "vision_ms": timings.get("vision", 0.0),
        "select_ms": timings.get("select", 0.0),
        "prefill_ms": timings.get("prefill", 0.0),
        "e2e_ms": timings["e2e"],
        "decode_ms_per_token": timings["decode"] / max(1, batch.n_generated - 1),
        "kv_cache_mb": kv_cache_mb(sample.kv_len_per_layer, 1, shape, bytes_per_elem),
        "peak_mem_mb": memory.peak_mb,
        "peak_mem_source": memory.source,
        "batch_size": len(batch.samples),
    }
