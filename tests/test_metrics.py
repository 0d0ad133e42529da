"""tokbench/metrics.py and tokbench/summary.py: each figure against a hand computation."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from tokbench.metrics import (
    LLMShape,
    PeakMemory,
    StageTimer,
    kv_cache_mb,
    layer_flops,
    prefill_flops,
    retention_figures,
)
from tokbench.summary import summarize, summary_table

# d=8, m=16, h=2 query heads, g=1 kv head, e=4, V=32, L=2
TINY = LLMShape(n_layers=2, hidden=8, intermediate=16, n_heads=2, n_kv_heads=1, head_dim=4, vocab=32)


def test_shape_from_hf_style_config_defaults_head_dim_and_kv_heads():
    config = SimpleNamespace(
        num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2, vocab_size=32,
        num_key_value_heads=1, head_dim=None,
    )  # fmt: skip
    assert LLMShape.from_config(config) == TINY
    del config.num_key_value_heads
    assert LLMShape.from_config(config).n_kv_heads == 2


def test_shape_from_real_qwen_and_llama_configs():
    from transformers import LlavaConfig, Qwen2_5_VLConfig

    qwen = LLMShape.from_config(Qwen2_5_VLConfig().get_text_config())
    assert (qwen.n_heads, qwen.n_kv_heads, qwen.head_dim) == (64, 8, 8192 // 64)
    llama = LLMShape.from_config(LlavaConfig().get_text_config())
    assert (llama.n_layers, llama.hidden, llama.n_kv_heads, llama.head_dim) == (32, 4096, 32, 128)


def test_layer_flops_matches_hand_computation():
    n = 10
    q = 2 * n * 8 * (2 * 4)  # 1280
    kv = 2 * 2 * n * 8 * (1 * 4)  # 1280
    o = 2 * n * (2 * 4) * 8  # 1280
    mlp = 3 * 2 * n * 8 * 16  # 768 + 768 + 768 + 4608 + 1152
    attention = 2 * 2 * n * n * 2 * 4  # 3200, full square
    assert q + kv + o + mlp + attention == 14720
    assert layer_flops(TINY, n) == 14720.0
    assert layer_flops(TINY, 0) == 0.0


def test_layer_flops_matches_fastv_formula_for_mha():
    # FastV: per layer 4nd^2 + 2n^2d + 2ndm FLOPs-as-MACs; x2 for FLOPs, with 3 MLP matrices -> 6ndm
    shape = LLMShape(n_layers=1, hidden=64, intermediate=256, n_heads=4, n_kv_heads=4, head_dim=16, vocab=10)
    n, d, m = 37, 64, 256
    assert layer_flops(shape, n) == 2 * (4 * n * d * d + 2 * n * n * d) + 6 * n * d * m


def test_prefill_flops_of_pruned_sequence_and_ratio():
    # layer 0 sees 10 tokens, layer 1 sees 6 (4 visual tokens dropped after layer 0)
    lm_head = 2 * 8 * 32  # 512
    full = 2 * 14720 + lm_head  # 29952
    # q 768 + k,v 768 + o 768 + MLP 4608 + attention 1152
    layer_6 = 2 * 6 * 8 * 8 + 4 * 6 * 8 * 4 + 2 * 6 * 8 * 8 + 6 * 6 * 8 * 16 + 4 * 36 * 8
    assert layer_6 == 8064
    pruned = 14720 + layer_6 + lm_head  # 23296
    assert prefill_flops(TINY, [10, 10]) == full
    assert prefill_flops(TINY, [10, 6]) == pruned
    assert prefill_flops(TINY, [10, 6]) / prefill_flops(TINY, [10, 10]) == pytest.approx(23296 / 29952)
    assert prefill_flops(TINY, [10, 6]) < prefill_flops(TINY, [10, 10])


def test_prefill_flops_rejects_wrong_layer_count():
    with pytest.raises(ValueError, match="3 layers; the model has 2"):
        prefill_flops(TINY, [1, 2, 3])


def test_kv_cache_mb():
    # (10 + 6) positions * 2 (K,V) * 1 kv head * 4 dims * 2 bytes * batch 3 = 768 bytes
    assert kv_cache_mb([10, 6], 3, TINY, 2) == pytest.approx(768 / 2**20)


def test_retention_figures_hand_example():
    figures = retention_figures(100, 50, [50, 50, 20, 20], "layer_avg")
    assert figures == {
        "retention": 0.35,
        "retention_input": 0.5,
        "retention_final": 0.2,
        "retention_layer_avg": 0.35,
    }
    assert retention_figures(100, 50, [50, 50, 20, 20], "input")["retention"] == 0.5
    assert retention_figures(100, 50, [50, 50, 20, 20], "final")["retention"] == 0.2


def test_retention_figures_errors_and_no_visual_tokens():
    with pytest.raises(ValueError, match="headline"):
        retention_figures(100, 50, [50], "average")
    with pytest.raises(ValueError, match="exceed the 100 visual tokens"):
        retention_figures(100, 120, [120], "input")
    assert retention_figures(0, 0, [0, 0], "input")["retention"] is None


def test_stage_timer_records_nested_and_repeated_spans():
    timer = StageTimer("cpu")
    with timer.span("ttft"):
        with timer.span("select"):
            time.sleep(0.01)
        with timer.span("select"):
            time.sleep(0.01)
    ms = timer.finish()
    assert set(ms) == {"ttft", "select"}
    assert ms["select"] >= 20.0
    assert ms["ttft"] >= ms["select"]


def test_stage_timer_excludes_bookkeeping_from_enclosing_spans():
    """A ``_count`` span (FLOP counting) is subtracted from every span open around it, once each."""
    timer = StageTimer("cpu")
    with timer.span("ttft"):
        with timer.span("select"):
            with timer.span("_count"):
                time.sleep(0.05)
        with timer.span("select"):
            pass
    outside = StageTimer("cpu")
    with outside.span("_count"):
        time.sleep(0.01)
    ms = timer.finish()
    assert set(ms) == {"ttft", "select"}
    assert ms["select"] < 25.0 and ms["ttft"] < 25.0  # the 50 ms of bookkeeping is gone from both
    assert outside.finish() == {}


def test_stage_timer_begin_end_and_mismatch():
    timer = StageTimer("cpu")
    timer.begin("glimpse")
    with timer.span("select"):
        pass
    timer.end("glimpse")
    assert set(timer.finish()) == {"glimpse", "select"}
    timer.begin("a")
    timer.begin("b")
    with pytest.raises(RuntimeError, match="'a' ended while 'b' is open"):
        timer.end("a")


def test_stage_timer_records_span_that_raises():
    timer = StageTimer()
    with pytest.raises(RuntimeError), timer.span("vision"):
        raise RuntimeError("boom")
    assert timer.finish()["vision"] >= 0.0


class _FakeEvent:
    """Stands in for torch.cuda.Event: a fake device clock advanced by the test."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = _FakeEvent.clock

    def elapsed_time(self, end):
        return end.at - self.at


def test_stage_timer_on_cuda_uses_events_and_one_synchronize(monkeypatch):
    torch = pytest.importorskip("torch")
    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    timer = StageTimer("cuda:0")
    with timer.span("ttft"):
        _FakeEvent.clock += 3.0
        with timer.span("vision"):
            _FakeEvent.clock += 2.0
        with timer.span("_count"):
            _FakeEvent.clock += 10.0
    assert syncs == []  # no synchronize while spans run
    assert timer.finish() == {"ttft": 5.0, "vision": 2.0}
    assert syncs == ["cuda:0"]


def test_peak_memory_on_cpu_samples_this_batch():
    """On Linux the peak is the largest RSS sampled during the batch, not the process's lifetime peak."""
    with PeakMemory("cpu", interval_s=0.001) as before:
        pass
    with PeakMemory("cpu", interval_s=0.001) as memory:
        block = bytearray(96 * 2**20)  # zero-filled: resident
        time.sleep(0.05)
    del block
    with PeakMemory("cpu", interval_s=0.001) as after:
        pass
    assert memory.source == "cpu_rss" and memory.nvml_peak_mb is None
    assert memory.peak_mb > before.peak_mb + 80
    assert after.peak_mb < memory.peak_mb - 80  # the block was freed: the next batch does not inherit it


def test_peak_memory_on_cuda_mocked(monkeypatch):
    """Allocator peak reset at entry and read at exit; NVML sampled on a thread during the batch."""
    torch = pytest.importorskip("torch")
    import tokbench.metrics as metrics

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 300 * 2**20)
    used = iter([1000.0] + [1500.0, 4000.0, 1200.0] + [1100.0] * 10_000)
    monkeypatch.setattr(metrics, "_nvml_reader", lambda device: lambda: next(used))
    with PeakMemory("cuda:0", interval_s=0.001) as memory:
        time.sleep(0.05)
    assert calls[:2] == ["sync", "reset"]
    assert memory.source == "cuda_allocator"
    assert memory.peak_mb == 300.0
    assert memory.nvml_peak_mb == 4000.0


@pytest.mark.gpu
def test_peak_memory_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    with PeakMemory(device) as memory:
        block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    del block
    assert memory.source == "cuda_allocator"
    assert memory.peak_mb >= 64
    assert memory.nvml_peak_mb is None or memory.nvml_peak_mb >= 64
    timer = StageTimer(device)
    with timer.span("matmul"):
        torch.randn(512, 512, device=device) @ torch.randn(512, 512, device=device)
    assert timer.finish()["matmul"] > 0


def test_summarize_and_table():
    rows = [
        {"doc_id": 0, "score": 1.0, "retention": 0.25, "ttft_ms": 10.0, "peak_mem_mb": 5.0, "flops_ratio": 0.3,
         "peak_mem_source": "cpu_rss", "error": None},
        {"doc_id": 1, "score": 0.0, "retention": 0.75, "ttft_ms": 30.0, "peak_mem_mb": 7.0, "flops_ratio": 0.5,
         "peak_mem_source": "cpu_rss", "error": None},
        {"doc_id": 2, "score": None, "ttft_ms": 999.0, "error": "OSError: missing image"},
    ]  # fmt: skip
    summary = summarize(rows)
    assert summary["n"] == 3 and summary["n_errors"] == 1
    assert summary["accuracy"] == 0.5
    assert summary["retention"] == 0.5
    assert summary["ttft_ms"] == 20.0
    assert summary["ttft_p50_ms"] == 20.0 and summary["ttft_p90_ms"] == pytest.approx(28.0)
    assert summary["peak_mem_mb"] == 7.0 and summary["flops_ratio_llm"] == pytest.approx(0.4)  # an older row's flops_ratio
    assert summary["retention_input"] is None
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(summary_table(summary, title="run"))
    text = console.export_text()
    assert "accuracy" in text and "0.5000" in text and "50.0%" in text and "cpu_rss" in text


def test_live_tensor_peak_sees_an_n_by_n_map_and_not_flash_attention():
    """An explicit n x n score matrix grows 4x per doubling; SDPA's fused kernel stays linear."""
    torch = pytest.importorskip("torch")
    from tokbench.metrics import LiveTensorPeak

    def explicit(n):
        x = torch.randn(n, 64)
        with LiveTensorPeak() as peak:
            scores = (x @ x.T).softmax(-1)
            out = scores @ x
            del scores
        return peak.peak_mb, out

    def fused(n):
        q = torch.randn(1, 4, n, 16)
        with LiveTensorPeak() as peak:
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return peak.peak_mb

    small, _ = explicit(512)
    large, _ = explicit(1024)
    assert small >= 2 * 512 * 512 * 4 / 2**20  # two n x n float32 maps alive at once (logits, softmax)
    assert large / small > 3.5
    assert fused(2048) / fused(1024) < 2.2


def test_call_peak_on_cuda_is_what_the_call_adds(monkeypatch):
    """Allocator peak during the call minus what was allocated before it (weights, inputs)."""
    torch = pytest.importorskip("torch")
    from tokbench.metrics import call_peak_mb

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350 * 2**20)
    assert call_peak_mb("cuda:0", lambda: calls.append("call")) == 250.0
    assert calls == ["sync", "reset", "call", "sync"]
