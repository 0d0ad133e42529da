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

import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
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


def vision_block_flops(tokens: int, hidden: int, intermediate: int, mlp_matmuls: int, attention_pairs: int) -> float:
    """Analytic FLOPs of one vision-transformer block on ``tokens`` patches (2 FLOPs per multiply-add).

    projections   2·P·d_v·3d_v [qkv] + 2·P·d_v·d_v [out]
    MLP           mlp_matmuls · 2·P·d_v·m_v   (3 for a gated MLP (Qwen2.5-VL), 2 for CLIP's)
    attention     2·2·d_v·attention_pairs, where attention_pairs = Σ over attention groups of size²
                  (P² for one full-attention image; Σ wᵢ² over windows for window attention): q·kᵀ and
                  weights·v over the full (bidirectional) square, the LLM's convention.
    Example: P=4, d_v=2, m_v=4, gated, one full group (16 pairs) → 96 + 32 + 192 + 128 = 448.
    """
    projections = 2 * tokens * hidden * 3 * hidden + 2 * tokens * hidden * hidden
    mlp = mlp_matmuls * 2 * tokens * hidden * intermediate
    return float(projections + mlp + 2 * 2 * hidden * attention_pairs)


def attention_row_flops(shape: LLMShape, seq_len: int, rows: int = 1) -> float:
    """FLOPs of ``rows`` recomputed LLM attention rows (`tokbench.attention.attention_row`, `last_rows`)
    over ``seq_len`` keys: the query projections 2·rows·d·(h·e), the key projection of every token
    2·L·d·(g·e), and the logits 2·rows·h·e·L. Methods' selection cost at `llm(k)` stages and
    GlimpsePrune's probe rows."""
    q_dim, kv_dim = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    return float(2 * rows * shape.hidden * q_dim + 2 * seq_len * shape.hidden * kv_dim + 2 * rows * q_dim * seq_len)


def flops_ratios(llm: float, vision: float, select: float, llm_full: float, vision_full: float) -> dict[str, float]:
    """``flops_ratio_llm`` = llm / llm_full; ``flops_ratio_total`` = (llm + vision + select) /
    (llm_full + vision_full). The full-token run does no selection work; the speedup bound is
    1 / flops_ratio_total."""
    return {"flops_ratio_llm": llm / llm_full, "flops_ratio_total": (llm + vision + select) / (llm_full + vision_full)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running ``fn()`` as torch's ``FlopCounterMode`` counts them (matmul-class ops, convolutions
    and attention kernels; 2 FLOPs per multiply-add), with CPU SDPA counted like its CUDA kernels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


# --- time and memory ------------------------------------------------------------------------------
def _is_cuda(device: Any) -> bool:
    return device is not None and str(getattr(device, "type", device)).startswith("cuda")


class StageTimer:
    """Named spans in milliseconds over one batch: ``with timer.span("vision"): ...`` (or ``begin``/``end``
    for a span that does not follow the code's blocks); then ``timer.finish()`` returns ``{name: ms}``.

    A name used more than once adds up (one ``select`` per stage); spans may nest. Spans whose name
    starts with ``_`` are the harness's own bookkeeping: they are left out of the result and their time
    is subtracted from every span open around them. On a CUDA device each span edge records a CUDA
    event on the current stream and ``finish`` synchronises once; on CPU each edge reads
    ``time.perf_counter``.
    """

    def __init__(self, device: Any = None):
        self.device = device
        self._cuda = _is_cuda(device)
        self._spans: list[tuple[str, Any, Any, tuple[str, ...]]] = []  # name, start, end, enclosing names
        self._open: list[tuple[str, Any]] = []

    def _mark(self) -> Any:
        if self._cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self, name: str) -> None:
        self._open.append((name, self._mark()))

    def end(self, name: str) -> None:
        open_name, start = self._open.pop()
        if open_name != name:
            raise RuntimeError(f"span {name!r} ended while {open_name!r} is open")
        self._spans.append((name, start, self._mark(), tuple(n for n, _ in self._open)))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def finish(self) -> dict[str, float]:
        """Milliseconds per span name, bookkeeping excluded (the one synchronize on CUDA)."""
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.device)
        ms: dict[str, float] = {}
        for name, start, end, enclosing in self._spans:
            elapsed = start.elapsed_time(end) if self._cuda else (end - start) * 1000.0
            for target in (name,) if not name.startswith("_") else set(enclosing):
                sign = -1.0 if name.startswith("_") else 1.0
                ms[target] = ms.get(target, 0.0) + sign * elapsed
        return ms


_NVML: dict[str, Any] = {}


def _nvml_handle(device: Any) -> Any:
    """The NVML handle of ``device`` (by UUID, which ignores CUDA_VISIBLE_DEVICES renumbering), or None."""
    try:
        import pynvml
        import torch

        if not _NVML:
            pynvml.nvmlInit()
            _NVML["ok"] = True
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # noqa: BLE001 - older drivers/torch: fall back to the index
            return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - NVML is optional (missing package, no driver, MIG)
        return None


def _nvml_reader(device: Any) -> Callable[[], float] | None:
    """A function returning the device memory in use per NVML (MB; every process, context included)."""
    handle = _nvml_handle(device)
    if handle is None:
        return None
    import pynvml

    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB


def _rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _rss_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakSampler:
    """Polls ``read()`` (MB) on a background thread every ``interval_s`` while active; ``peak_mb`` is
    the largest value seen, including one read at entry and one at exit."""

    def __init__(self, read: Callable[[], float], interval_s: float = 0.005):
        self.read = read
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tokbench-memory-sampler")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self.read())

    def __enter__(self) -> PeakSampler:  # noqa: PYI034
        self.peak_mb = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.read())
        return False


class PeakMemory:
    """Peak memory over one batch: ``with PeakMemory(device) as memory: ...``; then read

    peak_mb (float): on CUDA, ``torch.cuda.max_memory_allocated`` after resetting the peak stats at
        entry (live tensors, weights included; not the allocator's cache or the CUDA context);
        on CPU, the largest resident set size of the process sampled during the batch (weights,
        allocator caches and everything else the process holds).
    source (str): "cuda_allocator", "cpu_rss", or "cpu_maxrss" where /proc is missing (the process's
        lifetime peak ``ru_maxrss``, not this batch's).
    nvml_peak_mb (float | None): on CUDA, the largest device memory in use per NVML sampled by a
        background thread during the batch (every process, cache and CUDA context included);
        None on CPU or without NVML.
    """

    def __init__(self, device: Any = None, interval_s: float = 0.005):
        self.device = device
        cuda = _is_cuda(device)
        read = _nvml_reader(device) if cuda else _cpu_reader()
        self.source = "cuda_allocator" if cuda else "cpu_rss" if read is not None else "cpu_maxrss"
        self.peak_mb: float = 0.0
        self.nvml_peak_mb: float | None = None
        self._sampler = PeakSampler(read, interval_s) if read is not None else None

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.source == "cuda_allocator":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._sampler is not None:
            self._sampler.__enter__()
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
        if self._sampler is not None:
            self._sampler.__exit__(None, None, None)
            if self.source == "cuda_allocator":
                self.nvml_peak_mb = self._sampler.peak_mb
            else:
                self.peak_mb = self._sampler.peak_mb
        elif self.source == "cpu_rss":
            self.peak_mb = _rss_peak_mb()


def _cpu_reader() -> Callable[[], float] | None:
    """RSS reader where /proc exists (Linux); elsewhere None (the process-lifetime ``ru_maxrss`` is used)."""
    return _rss_mb if os.path.exists("/proc/self/statm") else None


class LiveTensorPeak:
    """Peak bytes of live tensors created inside ``with LiveTensorPeak() as peak: ...`` (a torch dispatch
    mode); read ``peak.peak_mb``. Tensors made before entry (weights, inputs) are not counted.

    Every tensor an operator returns is booked once per storage and released when the last Python tensor
    viewing it is collected, so the figure is the largest set of intermediate tensors alive at any
    operator boundary: device-independent and exact where RSS is not (allocator caches, the kernels' own
    scratch space inside one operator are not seen). Used on CPU by the memory benchmark and its tests;
    on CUDA, ``torch.cuda.max_memory_allocated`` measures the same thing.
    """

    def __init__(self):
        self.peak_mb = 0.0
        self._live = 0
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [live tensors, bytes]
        self._mode = None

    def __enter__(self) -> LiveTensorPeak:  # noqa: PYI034
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                        tracker._book(tensor)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._mode.__exit__(*exc)
        return False

    def _book(self, tensor) -> None:
        import weakref

        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key in self._refs:
            self._refs[key][0] += 1
        else:
            self._refs[key] = [1, storage.nbytes()]
            self._live += storage.nbytes()
            self.peak_mb = max(self.peak_mb, self._live / MB)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._refs[key]
            self._live -= entry[1]


def call_peak_mb(device: Any, fn: Callable[[], Any]) -> float:
    """Peak memory ``fn()`` adds (MB): on CUDA ``max_memory_allocated`` after a reset minus what was
    allocated before the call (weights and inputs); on CPU the `LiveTensorPeak` of the call."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MB
    with LiveTensorPeak() as peak:
        fn()
    return peak.peak_mb
