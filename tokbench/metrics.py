"""The one implementation of each reported figure: retention, prefill FLOPs, KV-cache size, stage
timings and peak memory.

Notation: ``n`` sequence length (text + visual tokens) entering a decoder layer, ``d`` hidden size,
``m`` MLP intermediate size, ``h`` query heads, ``g`` key/value heads (GQA), ``e`` head dim,
``V`` vocabulary, ``L`` decoder layers.

Units: FLOPs count a multiply-add as 2 FLOPs; memory is in MB meaning MiB (2**20 bytes), the same unit
for the CUDA allocator, NVML, CPU RSS and the KV cache; times are milliseconds.

This module imports nothing heavy at import time: torch and pynvml are imported only when a CUDA
device is measured.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

MB = 2**20
HEADLINES = ("input", "final", "layer_avg")


# --- model shape and FLOPs ------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMShape:
    """The decoder dimensions the analytic figures need (the LLM only; the vision tower is not counted)."""

    n_layers: int  # L
    hidden: int  # d
    intermediate: int  # m
    n_heads: int  # h
    n_kv_heads: int  # g
    head_dim: int  # e
    vocab: int  # V

    @classmethod
    def from_config(cls, text_config: Any) -> LLMShape:
        """Read a Hugging Face text config (Qwen2 / Llama attribute names).

        ``num_key_value_heads`` defaults to ``num_attention_heads`` (no GQA) and ``head_dim`` to
        ``hidden_size // num_attention_heads`` when the config leaves them unset (Qwen2 configs do).
        """
        n_heads = int(text_config.num_attention_heads)
        n_kv_heads = getattr(text_config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
        return cls(
            n_layers=int(text_config.num_hidden_layers),
            hidden=int(text_config.hidden_size),
            intermediate=int(text_config.intermediate_size),
            n_heads=n_heads,
            n_kv_heads=int(n_kv_heads),
            head_dim=int(head_dim),
            vocab=int(text_config.vocab_size),
        )


def layer_flops(shape: LLMShape, seq_len: int) -> float:
    """Analytic prefill FLOPs of one decoder layer on ``seq_len`` (n) tokens.

    projections   2·n·d·(h·e)  [q]  + 2·2·n·d·(g·e)  [k, v]  + 2·n·(h·e)·d  [o]
    gated MLP     3 · 2·n·d·m  [gate, up, down]
    attention     2·2·n²·h·e   [q·kᵀ and weights·v over the FULL n×n square]

    The attention term counts the full square, not the causal half, the convention of FastV and
    PyramidDrop's FLOPs formula (4nd² + 2n²d + 2ndm for MHA with d = h·e), so ratios compare with
    the papers' numbers. Norms, RoPE, softmax, biases and activations are left out (O(n·d)).
    Example: d=8, m=16, h=2, g=1, e=4, n=10 → 1280 + 1280 + 1280 + 7680 + 3200 = 14720.
    """
    if seq_len < 0:
        raise ValueError(f"sequence length {seq_len} is negative")
    n, d = seq_len, shape.hidden
    q_dim, kv_dim = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    projections = 2 * n * d * q_dim + 2 * 2 * n * d * kv_dim + 2 * n * q_dim * d
    mlp = 3 * 2 * n * d * shape.intermediate
    attention = 2 * 2 * n * n * shape.n_heads * shape.head_dim
    return float(projections + mlp + attention)


def prefill_flops(shape: LLMShape, seq_len_per_layer: list[int]) -> float:
    """Prefill FLOPs of the LLM: ``layer_flops`` of each layer on the tokens entering it, plus the
    LM head (2·d·V) on the one position whose logits give the first token.

    seq_len_per_layer (list[int], (L,)): tokens (text + kept visual) entering each decoder layer.
    A method's ``flops_ratio`` is ``prefill_flops(pruned lengths) / prefill_flops(full lengths)``.
    """
    if len(seq_len_per_layer) != shape.n_layers:
        raise ValueError(f"got sequence lengths for {len(seq_len_per_layer)} layers; the model has {shape.n_layers}")
    lm_head = 2 * shape.hidden * shape.vocab
    return sum(layer_flops(shape, n) for n in seq_len_per_layer) + float(lm_head)


def kv_cache_mb(per_layer_lengths: list[int], batch: int, shape: LLMShape, bytes_per_elem: int) -> float:
    """Size of the KV cache in MB (MiB): Σ_layers 2 (K and V) · batch · length · g · e · bytes_per_elem.

    per_layer_lengths (list[int], (L,)): cached positions in each layer (layers may differ after a
    drop); ``batch`` multiplies them (pass 1 for one sample). ``bytes_per_elem``: 2 for bf16/fp16.
    """
    if len(per_layer_lengths) != shape.n_layers:
        raise ValueError(f"got cache lengths for {len(per_layer_lengths)} layers; the model has {shape.n_layers}")
    per_position = 2 * shape.n_kv_heads * shape.head_dim * bytes_per_elem
    return batch * sum(per_layer_lengths) * per_position / MB


# --- retention ------------------------------------------------------------------------------------
def retention_figures(
    n_visual: int, n_kept_input: int, kept_per_layer: list[int], headline: str
) -> dict[str, float | None]:
    """Fractions of the ``n_visual`` tokens the image produced (DESIGN.md "Measurement").

    n_kept_input: visual tokens entering LLM layer 0 (after vision/embed stages).
    kept_per_layer (list[int], (L,)): visual tokens entering each decoder layer during prefill.
    headline: which figure the method's budget is defined on — "input" (pre-LLM methods),
    "final" (GlimpsePrune) or "layer_avg" (FastV, PyramidDrop, VScan).

    Returns retention_input = n_kept_input / n_visual, retention_final = kept_per_layer[-1] / n_visual,
    retention_layer_avg = mean(kept_per_layer) / n_visual and retention = the headline one.
    Example: n_visual=100, n_kept_input=50, kept_per_layer=[50, 50, 20, 20] →
    input 0.5, final 0.2, layer_avg 0.35. A sample without visual tokens gets ``None`` for all four.
    """
    if headline not in HEADLINES:
        raise ValueError(f"headline retention {headline!r}: use one of {', '.join(HEADLINES)}")
    if not kept_per_layer:
        raise ValueError("kept_per_layer is empty; the engine must report one count per decoder layer")
    if n_visual == 0:
        return {"retention": None, "retention_input": None, "retention_final": None, "retention_layer_avg": None}
    if n_visual < 0 or n_kept_input > n_visual or max(kept_per_layer) > n_visual:
        raise ValueError(
            f"kept counts (input {n_kept_input}, per layer max {max(kept_per_layer)}) exceed the {n_visual} visual tokens"
        )
    figures = {
        "retention_input": n_kept_input / n_visual,
        "retention_final": kept_per_layer[-1] / n_visual,
        "retention_layer_avg": sum(kept_per_layer) / len(kept_per_layer) / n_visual,
    }
    return {"retention": figures[f"retention_{headline}"], **figures}


# --- time and memory ------------------------------------------------------------------------------
def _is_cuda(device: Any) -> bool:
    return device is not None and str(getattr(device, "type", device)).startswith("cuda")


class StageTimer:
    """Named wall-clock spans in milliseconds: ``with timer.span("vision"): ...``; read ``timer.ms``.

    Spans may nest (``ttft`` around ``vision`` and ``prefill``); a name used more than once adds up
    (one ``select`` per stage). On a CUDA device each span edge calls ``torch.cuda.synchronize`` so
    queued kernels are counted in the span that launched them.
    """

    def __init__(self, device: Any = None):
        self.device = device
        self.ms: dict[str, float] = {}
        self._cuda = _is_cuda(device)

    def _sync(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.device)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0


_NVML: dict[str, Any] = {}


def _nvml_used_mb(device: Any) -> float | None:
    """Memory in use on the GPU per NVML (all processes, CUDA context included), or None."""
    try:
        import pynvml
        import torch

        if not _NVML:
            pynvml.nvmlInit()
            _NVML["ok"] = True
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        try:  # NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES; the UUID is unambiguous
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # noqa: BLE001 - older drivers/torch: fall back to the index
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB
    except Exception:  # noqa: BLE001 - NVML is optional (missing package, no driver, MIG)
        return None


def _rss_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory over one batch: ``with PeakMemory(device) as memory: ...``; then read

    peak_mb (float): on CUDA, ``torch.cuda.max_memory_allocated`` after resetting the peak stats at
        entry (tensors only; the allocator's cache and the CUDA context are not included);
        on CPU, the process's peak resident set size (``ru_maxrss``) — a peak over the whole process
        lifetime so far, not this batch alone.
    source (str): "cuda_allocator" or "cpu_rss".
    nvml_mb (float | None): on CUDA, device memory in use per NVML at the end of the batch (every
        process, cache and context included; a snapshot, not a peak); None on CPU or without NVML.
    """

    def __init__(self, device: Any = None):
        self.device = device
        self.source = "cuda_allocator" if _is_cuda(device) else "cpu_rss"
        self.peak_mb: float = 0.0
        self.nvml_mb: float | None = None

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.source == "cuda_allocator":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            self._measure()
        except Exception:  # never mask the error that ended the batch
            if exc_type is None:
                raise
        return False

    def _measure(self) -> None:
        if self.source == "cuda_allocator":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
            self.nvml_mb = _nvml_used_mb(self.device)
        else:
            self.peak_mb = _rss_peak_mb()
