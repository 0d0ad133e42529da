"""The timing model (docs/metrics.md): which span each piece of work is booked under, and the per-row fields."""

from __future__ import annotations

import time

import pytest
from conftest import noise_image

from tokbench.engine import Engine
from tokbench.pruner import Budget, build_method
from tokbench.records import SPANS, timing_fields


def test_timing_fields_amortise_batch_latency():
    timings = {"preprocess": 8.0, "vision": 12.0, "select": 4.0, "prefill": 24.0, "ttft": 40.0, "ttft_e2e": 48.0,
               "decode": 30.0, "e2e": 78.0}  # fmt: skip
    fields = timing_fields(timings, batch_size=4, n_generated=4)
    assert fields["batch_size"] == 4
    assert fields["ttft_batch_ms"] == 40.0 and fields["ttft_ms"] == 10.0  # per sample = batch / b
    assert fields["ttft_e2e_ms"] == 12.0 and fields["e2e_ms"] == 19.5
    assert fields["glimpse_batch_ms"] is None and fields["glimpse_ms"] is None
    assert fields["decode_batch_ms_per_token"] == 10.0 and fields["decode_ms_per_token"] == 2.5  # 3 steps after the first
    assert {f"{s}_ms" for s in SPANS} <= set(fields)


def _slow(monkeypatch, obj, name, seconds=0.06):
    original = getattr(obj, name)

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, slowed)


def _timings(engine):
    out = engine.generate([[noise_image(224, 224)]], ["What colour is the square?"], [0], max_new_tokens=2)
    return out.timings_ms


def test_vision_statistics_are_selection_time(adapter, monkeypatch):
    """VisionZip's attention statistics are work the method causes: select, not vision."""
    _slow(monkeypatch, adapter, "vision_attention")
    ms = _timings(Engine(adapter, build_method("visionzip", Budget.ratio(0.25))))
    assert ms["select"] >= 60.0 and ms["vision"] < 60.0


def test_attention_rows_are_selection_time(adapter, monkeypatch):
    import tokbench.stages as stages_module

    _slow(monkeypatch, stages_module, "attention_row")
    ms = _timings(Engine(adapter, build_method("fastv", Budget.ratio(0.5), {"k": "1"})))
    assert ms["select"] >= 60.0 and ms["prefill"] < 60.0


def test_method_select_is_selection_time_and_flop_counting_is_excluded(qwen, monkeypatch):
    """The method's own call is select; the FLOP-counting rerun of it is excluded from every span."""
    method = build_method("divprune", Budget.ratio(0.25))
    _slow(monkeypatch, method, "select", seconds=0.05)  # runs twice: once timed, once counted
    ms = _timings(Engine(qwen, method))
    assert 50.0 <= ms["select"] < 100.0
    assert ms["ttft"] == pytest.approx(ms["vision"] + ms["select"] + ms["prefill"])
    assert ms["e2e"] < ms["ttft_e2e"] + ms["decode"] + 50.0


def test_spans_add_up_and_preprocess_is_outside_ttft(adapter, monkeypatch):
    _slow(monkeypatch, adapter, "preprocess")
    ms = _timings(Engine(adapter, build_method("full", Budget.full())))
    assert ms["preprocess"] >= 60.0 and ms["ttft"] < 60.0
    assert ms["ttft_e2e"] == pytest.approx(ms["preprocess"] + ms["ttft"])
    assert ms["e2e"] >= ms["ttft_e2e"] + ms["decode"]
    assert "glimpse" not in ms


def test_glimpse_pass_is_reported_on_its_own(qwen):
    engine = Engine(qwen, build_method("glimpseprune", None))
    ms = _timings(engine)
    assert 0 < ms["glimpse"] <= ms["ttft"] - ms["vision"]
