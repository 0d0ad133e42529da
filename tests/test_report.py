"""tokbench/report.py: aggregation, full reference, paired bootstrap, renderers; `tokbench report`.

``write_runs`` builds synthetic run directories through ``RunStore`` (no model); test_regress.py and
test_plots.py import it too.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tokbench.aggregates import bootstrap_ci
from tokbench.cli import app
from tokbench.report import aggregate, budget_sort_key, report, to_latex, to_markdown
from tokbench.store import RunStore, load_runs, make_run_id
from tokbench.summary import summarize

N_DOCS = 8
# (method, ratio) -> per-document scores
SCORES = {
    ("full", 1.0): [1, 1, 1, 1, 1, 1, 0, 0],
    ("random", 0.25): [1, 0, 1, 0, 1, 0, 0, 0],
    ("random", 0.5): [1, 1, 1, 0, 1, 0, 0, 1],
    ("pool", 0.25): [1, 1, 0, 1, 1, 1, 0, 0],
}


def write_runs(root, scores=SCORES, task="vstar-synth", model="tiny-qwen2.5-vl", ttft_full=100.0, seed=0,
               legacy=False, settings=None, **config_extra):
    """One run directory per (method, ratio) under ``root`` with a manifest and a summary, as the runner writes.

    ``legacy``: rows as runs before the timing/FLOPs rework wrote them (``flops_ratio``, no batch
    latencies); ``settings``/``config_extra``: manifest settings and extra config keys."""
    rng = np.random.default_rng(seed)
    for (method, ratio), values in scores.items():
        config = {"model": model, "method": method, "task": task, "ratio": None if method == "full" else ratio,
                  "budget": None, "limit": len(values), "seed": 0, **config_extra}  # fmt: skip
        label = f"r{ratio:g}"
        store = RunStore(root, make_run_id({**config, "budget_label": label}))
        store.open(config)
        if settings:
            store.update_manifest(settings=settings)
        rows = []
        for doc_id, score in enumerate(values):
            ttft = ttft_full * (0.3 + 0.7 * ratio) * (1 + 0.02 * rng.standard_normal())
            rows.append({
                "run_id": store.run_id, "model": model, "method": method, "budget": label, "task": task,
                "doc_id": doc_id, "prediction": "x", "target": "x", "score": float(score),
                "n_visual": 64, "n_kept_input": round(64 * ratio), "kept_per_layer": [round(64 * ratio)] * 4,
                "retention": ratio, "retention_input": ratio, "retention_final": ratio, "retention_layer_avg": ratio,
                "flops_ratio_llm": 0.2 + 0.8 * ratio, "flops_ratio_total": 0.3 + 0.7 * ratio,
                "ttft_ms": ttft, "ttft_batch_ms": ttft, "vision_ms": 1.0, "select_ms": 0.1,
                "prefill_ms": ttft - 1.1, "e2e_ms": ttft * 2, "decode_ms_per_token": 3.0, "kv_cache_mb": ratio,
                "peak_mem_mb": 500 + 400 * ratio, "peak_mem_source": "cuda_allocator", "batch_size": 1, "error": None,
            })  # fmt: skip
        if legacy:
            for row in rows:
                row["flops_ratio"] = row.pop("flops_ratio_llm")
                del row["flops_ratio_total"], row["ttft_batch_ms"]
        with open(store.samples_path, "a", encoding="utf-8") as f:  # as written; the schema check is store's
            f.writelines(json.dumps(row) + "\n" for row in rows)
        store.update_manifest(summary=summarize(store.records()))
    return root


@pytest.fixture
def runs(tmp_path):
    return write_runs(tmp_path / "runs")


def test_one_row_per_method_budget_with_full_first_at_100_percent(runs):
    table = report([runs])
    assert list(zip(table["method"], table["budget"])) == [
        ("full", "r1"), ("pool", "r0.25"), ("random", "r0.25"), ("random", "r0.5")
    ]
    full = table.iloc[0]
    assert full["acc_rel_full_pct"] == pytest.approx(100.0)
    assert full["retention"] == full["retention_input"] == 1.0
    assert full["speedup"] == pytest.approx(1.0)
    assert full["acc_diff"] == 0 and full["acc_diff_ci_low"] == full["acc_diff_ci_high"] == 0
    random_25 = table.set_index(["method", "budget"]).loc[("random", "r0.25")]
    assert random_25["accuracy"] == pytest.approx(3 / 8)
    assert random_25["acc_rel_full_pct"] == pytest.approx(100 * (3 / 8) / (6 / 8))
    assert random_25["acc_diff"] == pytest.approx(-3 / 8)
    assert random_25["acc_diff_ci_low"] <= -3 / 8 <= random_25["acc_diff_ci_high"] <= 0
    assert random_25["n_paired"] == N_DOCS
    assert random_25["speedup"] > 2 and random_25["flops_ratio_llm"] == pytest.approx(0.4)
    assert random_25["speedup_bound"] == pytest.approx(1 / (0.3 + 0.7 * 0.25))


def test_figures_match_the_run_summary(runs):
    """The same figures as tokbench.summary for a single run (one definition, two code paths)."""
    samples = load_runs([runs])
    row = aggregate(samples).set_index(["method", "budget"]).loc[("random", "r0.25")]
    records = samples[(samples["method"] == "random") & (samples["budget"] == "r0.25")].to_dict("records")
    summary = summarize(records)
    for key in ("accuracy", "retention", "flops_ratio_llm", "ttft_ms", "ttft_p50_ms", "ttft_p90_ms", "peak_mem_mb"):
        assert row[key] == pytest.approx(summary[key]), key


def test_error_rows_are_counted_not_averaged(runs):
    samples = load_runs([runs])
    broken = samples.index[(samples["method"] == "pool")][:2]
    samples.loc[broken, "error"] = "RuntimeError: boom"
    samples.loc[broken, "score"] = None
    row = aggregate(samples).set_index("method").loc["pool"]
    assert row["n"] == N_DOCS and row["n_errors"] == 2
    assert row["accuracy"] == pytest.approx(np.mean(SCORES[("pool", 0.25)][2:]))
    assert row["n_paired"] == N_DOCS - 2


def test_paired_bootstrap_is_seeded_and_covers_the_mean():
    diffs = np.array([0, -1, 0, 0, 1, -1, 0, -1], dtype=float)
    assert bootstrap_ci(diffs, seed=3) == bootstrap_ci(diffs, seed=3)
    low, high = bootstrap_ci(diffs)
    assert low < diffs.mean() < high
    assert bootstrap_ci(np.zeros(5)) == (0.0, 0.0)
    assert all(np.isnan(bootstrap_ci(np.array([]))))


def test_pairing_uses_common_documents_only(tmp_path):
    scores = {("full", 1.0): [1, 0, 1, 0], ("random", 0.5): [1, 1, 1, 1, 0, 0]}
    row = report([write_runs(tmp_path, scores, limit=None)]).set_index("method").loc["random"]
    assert row["n_paired"] == 4 and row["acc_diff"] == pytest.approx(0.5)


def test_budget_labels_sort_numerically():
    labels = ["n128", "r0.5", "r1", "r0.111", "dynamic", "n64"]
    assert sorted(labels, key=budget_sort_key) == ["r0.111", "r0.5", "r1", "n64", "n128", "dynamic"]


def test_several_models_are_never_averaged(tmp_path):
    write_runs(tmp_path, model="tiny-qwen2.5-vl")
    write_runs(tmp_path, model="tiny-llava", seed=1)
    table = report([tmp_path])
    assert table.columns[0] == "model" and len(table) == 2 * len(SCORES)
    assert (table[table["method"] == "full"]["acc_rel_full_pct"] == 100).all()


def test_renderers(runs):
    table = report([runs])
    md = to_markdown(table)
    assert md.splitlines()[0].startswith("| method") and "100.0%" in md and "-37.5 [" in md
    assert "\\begin{tabular}" in to_latex(table) and "95\\% CI" in to_latex(table)


def test_cli_report_formats_and_files(runs, tmp_path):
    cli = CliRunner()
    result = cli.invoke(app, ["report", str(runs), "--format", "csv", "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    csv = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert len(csv) == len(SCORES) and csv.loc[0, "acc_rel_full_pct"] == 100
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.md", "report.csv", "report.tex"}
    result = cli.invoke(app, ["report", str(runs), "--format", "json", "--by", "method,budget,task,run_id"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["full", "pool", "random", "random"]
    assert rows[2]["acc_rel_full_pct"] == pytest.approx(50.0)  # compared with full across run ids
    result = cli.invoke(app, ["report", str(runs)])
    assert result.exit_code == 0 and "random" in result.stdout and "r0.25" in result.stdout


def test_cli_report_usage_errors(tmp_path, runs):
    cli = CliRunner()
    assert cli.invoke(app, ["report", str(tmp_path / "nowhere")]).exit_code == 2
    result = cli.invoke(app, ["report", str(runs), "--by", "colour"])
    assert result.exit_code == 2 and "cannot group by colour" in result.output
    assert cli.invoke(app, ["report", str(runs), "--format", "xml"]).exit_code == 2
    result = cli.invoke(app, ["report", str(runs), "--by", "method,task"])  # would pool random's two budgets
    assert result.exit_code == 2
    assert "would pool budgets r0.25, r0.5 of random vstar-synth into one row; add budget to --by" in result.output
