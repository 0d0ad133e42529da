"""tokbench/aggregates.py: one definition of every aggregate, shared by the run summary, `report` and
`regress`; Visual-CoT's mean over subsets; rows split by settings; loyalty to `full`."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from tokbench.aggregates import (
    BATCH,
    PER_SAMPLE,
    aggregate,
    bootstrap_ci,
    normalize_prediction,
    paired,
)
from tokbench.report import ReportError, report, rich_table
from tokbench.store import RunStore, make_run_id
from tokbench.summary import summarize, summary_table


def write_run(root, rows, method="full", ratio=None, settings=None, **config):
    """A run directory holding ``rows`` (doc ids, scores, ... as given), as the runner writes it."""
    config = {"model": "tiny-qwen2.5-vl", "method": method, "task": "visual_cot", "ratio": ratio, "budget": None,
              "limit": None, "seed": 0, **config}  # fmt: skip
    label = "r1" if ratio is None else f"r{ratio:g}"
    store = RunStore(root, make_run_id({**config, "budget_label": label, "settings": settings}))
    store.open(config)
    store.update_manifest(settings=settings or {"batch_size": 1, "warmup": 0, "processes": 1})
    full = [{"run_id": store.run_id, "model": config["model"], "method": method, "budget": label,
             "task": config["task"], "prediction": "x", "error": None, **row} for row in rows]  # fmt: skip
    with open(store.samples_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in full)
    store.update_manifest(summary=summarize(full))
    return store.path


GQA_CUB = [{"doc_id": 0, "subset": "gqa", "score": 1.0}, {"doc_id": 1, "subset": "gqa", "score": 1.0},
           {"doc_id": 2, "subset": "gqa", "score": 1.0}, {"doc_id": 3, "subset": "cub", "score": 0.0}]  # fmt: skip


def test_visual_cot_summary_equals_report_unweighted_over_subsets(tmp_path):
    """The reported bug: gqa (1, 1, 1) and cub (0): the summary said 0.50, `report` 0.75."""
    run = write_run(tmp_path, GQA_CUB)
    summary = json.loads((run / "manifest.json").read_text())["summary"]
    row = report([tmp_path]).iloc[0]
    assert summary["accuracy"] == row["accuracy"] == pytest.approx(0.5)  # mean of gqa 1.0 and cub 0.0
    assert summary["accuracy_micro"] == row["accuracy_micro"] == pytest.approx(0.75)  # pooled, labelled
    assert summary["accuracy_by_subset"] == {"cub": 0.0, "gqa": 1.0}
    assert row["accuracy[gqa]"] == 1.0 and row["accuracy[cub]"] == 0.0
    assert (summary["acc_ci_low"], summary["acc_ci_high"]) == (row["acc_ci_low"], row["acc_ci_high"])
    # every figure of the one definition agrees between the two consumers
    for key, value in summary.items():
        if key in row.index and not isinstance(value, dict):
            assert (value is None and pd.isna(row[key])) or row[key] == value, key


def test_subset_bootstrap_resamples_within_subsets():
    scores, subsets = [1.0, 1.0, 1.0, 0.0], ["gqa", "gqa", "gqa", "cub"]
    # every resample keeps gqa at 1 and cub at 0: the unweighted mean is always 0.5
    assert bootstrap_ci(scores, subsets=subsets) == (0.5, 0.5)
    low, high = bootstrap_ci(scores)
    assert low < 0.75 < high


def test_fields_are_table_driven_and_older_rows_are_read():
    new = [{"doc_id": i, "score": 1.0, "flops_ratio_llm": 0.4, "flops_ratio_total": 0.5, "ttft_ms": 10.0 + i,
            "ttft_batch_ms": 40.0, "decode_batch_ms_per_token": 8.0, "peak_mem_mb": 100.0 + i, "nvml_peak_mb": 300.0 + i,
            "peak_mem_source": "cuda_allocator", "batch_size": 4} for i in range(4)]  # fmt: skip
    summary = aggregate(new)
    assert summary["flops_ratio_llm"] == 0.4 and summary["flops_ratio_total"] == 0.5
    assert summary["ttft_ms"] == 11.5 and summary["ttft_batch_ms"] == 40.0 and summary["ttft_p90_ms"] == pytest.approx(12.7)
    assert summary["nvml_peak_mb"] == 303.0 and summary["peak_mem_mb"] == 103.0
    assert summary["ttft_basis"] == PER_SAMPLE and summary["decode_batch_ms_per_token"] == 8.0
    assert summary["vision_ms"] is None  # absent field: no figure, no error
    old = [{"doc_id": 0, "score": 0.0, "flops_ratio": 0.3, "ttft_ms": 20.0}]
    summary = aggregate(old)
    assert summary["flops_ratio_llm"] == 0.3 and summary["flops_ratio_total"] is None and summary["ttft_basis"] == BATCH
    assert aggregate([*old, *new])["ttft_basis"] == "mixed"


def test_errors_counted_and_left_out_and_judged_rows_counted():
    rows = [{"doc_id": 0, "score": 1.0, "judge": "exact"}, {"doc_id": 1, "score": None, "judge": None},
            {"doc_id": 2, "score": 0.0, "error": "RuntimeError: boom", "judge": None},
            {"doc_id": 3, "score": None, "judge": float("nan")}]  # a row of an unjudged run, read through pandas
    summary = aggregate(rows)
    assert (summary["n"], summary["n_errors"], summary["n_unscored"], summary["accuracy"]) == (4, 1, 1, 1.0)


def test_summary_table_labels_the_ttft_and_the_subset_mean():
    summary = aggregate([{**row, "ttft_ms": 5.0, "ttft_batch_ms": 20.0} for row in GQA_CUB])
    console = Console(width=200, record=True)
    console.print(summary_table(summary, "run"))
    text = console.export_text()
    assert "TTFT mean (ms), per sample, batch/b" in text and "TTFT of a batch, mean (ms)" in text
    assert "95% CI (unweighted mean over subsets)" in text and "pooled over subsets (micro)" in text and "0.7500" in text
    assert "accuracy, cub" in text


# --- report never pools settings silently ---------------------------------------------------------
def _scores(values, ttft=10.0):
    return [{"doc_id": i, "score": float(v), "ttft_ms": ttft, "ttft_batch_ms": ttft, "retention": 1.0}
            for i, v in enumerate(values)]  # fmt: skip


def test_report_splits_batch_sizes_and_compares_timing_only_like_with_like(tmp_path):
    """The reported bug: a batch-10 run pooled with batch-1 runs gave "speedup 0.06x"."""
    b1, b10 = {"batch_size": 1, "warmup": 0}, {"batch_size": 10, "warmup": 0}
    write_run(tmp_path, _scores([1, 1, 0, 0], ttft=100.0), settings=b1)
    write_run(tmp_path, _scores([1, 0, 0, 0], ttft=50.0), method="random", ratio=0.25, settings=b1)
    write_run(tmp_path, _scores([1, 0, 0, 0], ttft=5.0), method="random", ratio=0.25, settings=b10)
    table = report([tmp_path])
    assert list(zip(table["method"], table["settings"])) == [("full", "batch_size=1"), ("random", "batch_size=1"),
                                                             ("random", "batch_size=10")]  # fmt: skip
    assert table["n"].tolist() == [4, 4, 4]  # nothing pooled
    one, ten = table.iloc[1], table.iloc[2]
    assert one["speedup"] == pytest.approx(2.0) and math.isnan(ten["speedup"])  # no full at batch 10
    assert ten["acc_diff"] == pytest.approx(-0.25) and ten["acc_rel_full_pct"] == pytest.approx(50.0)  # scores pair
    text = Console(width=200, record=True)
    text.print(rich_table(table))
    assert "batch_size=10" in text.export_text()


def test_report_splits_any_result_defining_setting_and_names_it(tmp_path):
    write_run(tmp_path, _scores([1, 1]), max_pixels=1000)
    write_run(tmp_path, _scores([1, 0]), max_pixels=2000)
    write_run(tmp_path, _scores([1, 0]), method="random", ratio=0.5, max_pixels=2000)
    table = report([tmp_path])
    assert table["settings"].tolist() == ["max_pixels=1000", "max_pixels=2000", "max_pixels=2000"]
    assert table.iloc[2]["acc_rel_full_pct"] == pytest.approx(100.0)  # against the full run at 2000


def test_report_pools_seeds_and_says_so(tmp_path):
    write_run(tmp_path, _scores([1, 1]))
    write_run(tmp_path, _scores([1, 0]), method="random", ratio=0.5, seed=0)
    write_run(tmp_path, _scores([0, 0]), method="random", ratio=0.5, seed=1)
    row = report([tmp_path]).iloc[1]
    assert row["runs"] == 2 and row["pooled"] == "seed=0,1" and row["n"] == 4 and row["accuracy"] == 0.25


def test_report_refuses_grouping_that_pools_budgets(tmp_path):
    write_run(tmp_path, _scores([1, 1]))
    write_run(tmp_path, _scores([1, 0]), method="random", ratio=0.5)
    write_run(tmp_path, _scores([0, 0]), method="random", ratio=0.25)
    with pytest.raises(ReportError, match="would pool budgets r0.25, r0.5 of random visual_cot into one row"):
        report([tmp_path], by=("method", "task"))


# --- loyalty ----------------------------------------------------------------------------------------
def test_agreement_is_the_share_of_identical_normalised_predictions():
    ref = [{"doc_id": i, "prediction": p, "score": 1.0} for i, p in enumerate(["The cat.", "red", "two", "left"])]
    own = [{"doc_id": i, "prediction": p, "score": s} for i, (p, s) in
           enumerate([("the  cat", 1.0), ("Red!", 1.0), ("three", 0.0), ("left", 1.0), ("extra", 1.0)])]  # fmt: skip
    result = paired(own, ref)
    assert result["n_agree"] == 4 and result["agreement"] == 0.75  # doc 4 has no reference answer
    assert result["n_paired"] == 4 and result["acc_diff"] == -0.25
    assert normalize_prediction(' "Yes." ') == "yes"


def _loyalty(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(123)
    ref = [{"doc_id": i, "prediction": "a", "score": 1.0} for i in range(n)]
    own = [{"doc_id": i, "prediction": "a" if s else "b", "score": float(s)} for i, s in enumerate(rng.random(n) < 0.7)]
    return paired(own, ref, seed=seed)


def test_paired_difference_ci_covers_the_mean_shrinks_with_n_and_is_seeded():
    small, large = _loyalty(40), _loyalty(640)
    for result in (small, large):
        assert result["acc_diff_ci_low"] < result["acc_diff"] < result["acc_diff_ci_high"]
        assert result["agreement_ci_low"] < result["agreement"] < result["agreement_ci_high"]
        assert result["agreement"] == pytest.approx(1 + result["acc_diff"])  # wrong exactly where it disagrees
    assert large["acc_diff_ci_high"] - large["acc_diff_ci_low"] < (small["acc_diff_ci_high"] - small["acc_diff_ci_low"]) / 2
    assert _loyalty(40, seed=5) == _loyalty(40, seed=5)
    values = np.random.default_rng(0).random(40)
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)


def test_report_shows_agreement_with_full(tmp_path):
    write_run(tmp_path, [{"doc_id": i, "score": 1.0, "prediction": p} for i, p in enumerate("abcd")])
    write_run(tmp_path, [{"doc_id": i, "score": 1.0, "prediction": p} for i, p in enumerate("abCx")], method="random", ratio=0.5)
    table = report([tmp_path])
    assert table["agreement"].tolist() == [1.0, 0.75] and table["n_agree"].tolist() == [4, 4]
    console = Console(width=200, record=True)
    console.print(rich_table(table))
    assert "75.0%" in console.export_text()


# --- the terminal table ---------------------------------------------------------------------------
def test_columns_and_fitting_a_width(tmp_path):
    write_run(tmp_path, _scores([1, 1]))
    write_run(tmp_path, _scores([1, 0]), method="random", ratio=0.5)
    table = report([tmp_path])
    console = Console(width=300, record=True)
    console.print(rich_table(table, columns=["acc", "p90"]))
    header = console.export_text().splitlines()[2]
    assert header.split() == ["method", "budget", "acc", "p90"]
    for width in (80, 100, 120):
        assert Console(width=1000).measure(rich_table(table, width=width)).maximum <= width
    with pytest.raises(ReportError, match="unknown column"):
        rich_table(table, columns=["colour"])


def test_two_full_rows_for_one_row_are_refused(tmp_path):
    write_run(tmp_path, _scores([1, 1]), seed=0)
    write_run(tmp_path, _scores([1, 0]), seed=1)
    write_run(tmp_path, _scores([1, 0]), method="random", ratio=0.5)
    assert report([tmp_path])["runs"].tolist() == [2, 1]  # seeds of full pooled into one reference
    with pytest.raises(ReportError, match="more than one 'full' row for task=visual_cot; narrow the runs or --by"):
        report([tmp_path], by=("method", "budget", "task", "run_id"))
