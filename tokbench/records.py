"""The efficiency half of a result row, from one engine sample: the one place each figure is computed."""

from __future__ import annotations

from typing import Any

from tokbench.engine import BatchOutput, SampleOutput
from tokbench.metrics import LLMShape, PeakMemory, flops_ratios, kv_cache_mb, prefill_flops, retention_figures

# Time spans of a batch (docs/metrics.md); each row carries ``<span>_batch_ms`` (the batch's latency)
# and ``<span>_ms`` (amortised per sample: batch latency / batch size, GlimpsePrune's per-sample figure).
SPANS = ("preprocess", "vision", "select", "glimpse", "prefill", "ttft", "ttft_e2e", "decode", "e2e")


def timing_fields(timings_ms: dict[str, float], batch_size: int, n_generated: int) -> dict[str, Any]:
    """Batch latencies and per-sample amortised times of every span, and decoding time per token.

    ``glimpse`` is None for methods without a glimpse stage. ``decode_batch_ms_per_token`` is the decoding
    time per decoding step of the batch (steps = tokens generated after the first); ``decode_ms_per_token``
    its amortised share (/ batch size). Example: ttft 40 ms for a batch of 4 → ttft_batch_ms 40, ttft_ms 10.
    """
    fields: dict[str, Any] = {"batch_size": batch_size}
    for span in SPANS:
        batch_ms = timings_ms.get(span)
        fields[f"{span}_batch_ms"] = batch_ms
        fields[f"{span}_ms"] = None if batch_ms is None else batch_ms / batch_size
    step_ms = timings_ms["decode"] / max(1, n_generated - 1)
    fields["decode_batch_ms_per_token"] = step_ms
    fields["decode_ms_per_token"] = step_ms / batch_size
    return fields


def flops_fields(sample: SampleOutput, shape: LLMShape) -> dict[str, float]:
    """``flops_llm``, ``flops_vision``, ``flops_select`` and the two ratios against the same sample unpruned."""
    n_text = sample.seq_len_per_layer[0] - sample.kept_per_layer[0]
    unpruned = [n_text + sample.n_visual] * len(sample.seq_len_per_layer)
    flops_llm = prefill_flops(shape, sample.seq_len_per_layer)
    return {
        "flops_llm": flops_llm,
        "flops_vision": sample.vision_flops,
        "flops_select": sample.select_flops,
        **flops_ratios(
            flops_llm, sample.vision_flops, sample.select_flops, prefill_flops(shape, unpruned), sample.vision_flops_full
        ),
    }


def efficiency_fields(
    sample: SampleOutput,
    batch: BatchOutput,
    memory: PeakMemory,
    shape: LLMShape,
    headline: str,
    bytes_per_elem: int,
) -> dict[str, Any]:
    """Counts, retention, FLOPs, timings and memory for one sample (DESIGN.md results schema)."""
    return {
        "n_visual": sample.n_visual,
        "n_kept_input": sample.n_kept_input,
        "kept_per_layer": sample.kept_per_layer,
        **retention_figures(sample.n_visual, sample.n_kept_input, sample.kept_per_layer, headline),
        **flops_fields(sample, shape),
        **timing_fields(batch.timings_ms, len(batch.samples), batch.n_generated),
        "kv_cache_mb": kv_cache_mb(sample.kv_len_per_layer, 1, shape, bytes_per_elem),
        "peak_mem_mb": memory.peak_mb,
        "peak_mem_source": memory.source,
        "nvml_peak_mb": memory.nvml_peak_mb,
    }
