"""tokbench/regress.py: baseline format, verdicts and tolerances; `tokbench regress` exit codes."""

from __future__ import annotations

import json

import pytest
from test_report import write_runs
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.regress import CHECKS, Tolerances, compare, entries_from_runs, load_baseline, parse_fraction, write_baseline

cli = CliRunner()


@pytest.fixture
def runs(tmp_path):
    return write_runs(tmp_path / "runs")


@pytest.fixture
def baseline(runs, tmp_path):
    path = tmp_path / "baselines" / "ci.json"
    result = cli.invoke(app, ["regress", str(runs), "--write-baseline", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _doctor(path, method, budget, **metrics):
    data = json.loads(path.read_text())
    for entry in data["entries"]:
        if (entry["method"], entry["budget"]) == (method, budget):
            entry["metrics"].update(metrics)
    path.write_text(json.dumps(data))
    return path


def test_baseline_format(baseline):
    data = json.loads(baseline.read_text())
    assert data["tokbench_baseline"] == 1 and data["sources"]
    entries = {(e["method"], e["budget"]): e for e in data["entries"]}
    assert set(entries) == {("full", "r1"), ("pool", "r0.25"), ("random", "r0.25"), ("random", "r0.5")}
    entry = entries[("random", "r0.25")]
    assert entry["task"] == "vstar-synth" and entry["model"] == "tiny-qwen2.5-vl" and entry["n"] == 8
    assert entry["metrics"]["accuracy"] == 0.375 and entry["metrics"]["accuracy_ci_halfwidth"] > 0
    assert {c.metric for c in CHECKS} <= entry["metrics"].keys()
    assert entry["device"]  # from the manifest's environment


def test_exit_0_against_own_results(runs, baseline):
    result = cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "| cell" in result.stdout
    assert "REGRESSED" not in result.stdout


def test_exit_1_when_baseline_accuracy_is_better_beyond_tolerance(runs, baseline, tmp_path):
    entry = next(e for e in load_baseline(baseline) if e["method"] == "random" and e["budget"] == "r0.25")
    margin = 0.005 + entry["metrics"]["accuracy_ci_halfwidth"]  # --tol-acc 0.5 points + CI half-width
    _doctor(baseline, "random", "r0.25", accuracy=entry["metrics"]["accuracy"] + margin + 0.02)
    summary = tmp_path / "summary.md"
    result = cli.invoke(app, ["regress", "--current", str(runs), "--baseline", str(baseline), "--summary", str(summary)])
    assert result.exit_code == 1, result.output
    failed = [line for line in result.stdout.splitlines() if "REGRESSED" in line]
    assert len(failed) == 1 and "| random r0.25 vstar-synth" in failed[0] and "| accuracy" in failed[0]
    assert "FAIL (1): random r0.25 vstar-synth accuracy" in result.stdout
    assert summary.read_text().startswith("### tokbench regression check: FAIL")


def test_accuracy_within_ci_halfwidth_passes(runs, baseline):
    entry = next(e for e in load_baseline(baseline) if e["method"] == "random" and e["budget"] == "r0.25")
    _doctor(baseline, "random", "r0.25", accuracy=entry["metrics"]["accuracy"] + entry["metrics"]["accuracy_ci_halfwidth"])
    assert cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline)]).exit_code == 0


def test_timing_tolerance_is_relative_and_device_aware(runs, baseline):
    entry = next(e for e in load_baseline(baseline) if e["method"] == "pool")
    _doctor(baseline, "pool", "r0.25", ttft_ms=entry["metrics"]["ttft_ms"] / 1.2)  # baseline 20% faster
    result = cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline)])
    assert result.exit_code == 1 and "ttft_ms" in next(ln for ln in result.stdout.splitlines() if "REGRESSED" in ln)
    assert cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline), "--tol-ttft", "25%"]).exit_code == 0
    assert cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline), "--timing", "off"]).exit_code == 0
    data = json.loads(baseline.read_text())
    for e in data["entries"]:
        e["device"] = "some other GPU"
    baseline.write_text(json.dumps(data))
    result = cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline)])
    assert result.exit_code == 0 and "not compared (other device)" in result.stdout


def test_retention_change_fails_either_way(runs, tmp_path):
    tol = Tolerances()
    current = entries_from_runs([runs])
    doctored = json.loads(json.dumps(current))
    doctored[1]["metrics"]["retention"] -= 0.05
    table = compare(doctored, current, tol)
    assert table[table["failed"]][["metric", "verdict"]].values.tolist() == [["retention", "CHANGED"]]


def test_missing_and_new_cells(runs, tmp_path):
    current = entries_from_runs([runs])
    extra = {**current[0], "method": "fastv"}
    table = compare([*current, extra], current[1:], Tolerances())
    verdicts = dict(zip(table["cell"], table["verdict"]))
    assert verdicts["fastv r1 vstar-synth"] == "missing" and verdicts["full r1 vstar-synth"] == "missing"
    assert table["failed"].any()
    assert not compare([*current, extra], current, Tolerances(allow_missing=True))["failed"].any()
    assert compare(current[1:], current, Tolerances()).set_index("cell").loc["full r1 vstar-synth", "verdict"] == "new"


def test_baseline_from_a_directory_of_runs_or_files(runs, baseline, tmp_path):
    assert cli.invoke(app, ["regress", str(runs), "--baseline", str(runs)]).exit_code == 0
    assert cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline.parent)]).exit_code == 0
    write_baseline([runs], baseline.parent / "copy.json")
    result = cli.invoke(app, ["regress", str(runs), "--baseline", str(baseline.parent)])
    assert result.exit_code == 2 and "two entries" in result.output


def test_usage_errors(runs, tmp_path):
    assert cli.invoke(app, ["regress", str(runs)]).exit_code == 2
    assert cli.invoke(app, ["regress", "--baseline", str(runs)]).exit_code == 2
    assert cli.invoke(app, ["regress", str(runs), "--baseline", str(tmp_path / "none.json")]).exit_code == 2
    not_baseline = tmp_path / "x.json"
    not_baseline.write_text("{}")
    result = cli.invoke(app, ["regress", str(runs), "--baseline", str(not_baseline)])
    assert result.exit_code == 2 and "not a tokbench baseline" in result.output
    assert cli.invoke(app, ["regress", str(runs), "--baseline", str(runs), "--tol-ttft", "fast"]).exit_code == 2


def test_parse_fraction():
    assert parse_fraction("10%") == pytest.approx(0.1) and parse_fraction("0.25") == 0.25
    with pytest.raises(ValueError):
        parse_fraction("-1")


def test_checked_in_baseline_reads_with_the_new_field_names():
    """A baseline written before flops_ratio_llm and ttft_basis (its flops_ratio is the LLM ratio, its
    ttft_ms a batch latency) still compares with today's: FLOPs by the new name, TTFT not at all."""
    from pathlib import Path

    new = load_baseline(Path(__file__).parents[1] / "results/baselines/canary-tiny-qwen2.5-vl.json")
    old = json.loads(json.dumps(new))
    for entry in old:  # the checked-in baseline as the previous format wrote it
        entry["metrics"]["flops_ratio"] = entry["metrics"].pop("flops_ratio_llm")
        entry["metrics"].pop("flops_ratio_total", None)
        entry["metrics"]["ttft_ms"] *= 10  # the batch latency at batch 10
        entry.pop("ttft_basis", None)
    table = compare(old, new, Tolerances(timing="on"))
    assert not table["failed"].any()
    verdicts = table.groupby("metric")["verdict"].agg(set)
    assert verdicts["flops_ratio_llm"] == {"ok"} and verdicts["ttft_ms"] == {"not compared (TTFT basis differs)"}
    new[1]["metrics"]["flops_ratio_llm"] += 0.05
    assert compare(old, new, Tolerances())["failed"].sum() == 1


def test_runs_of_one_cell_with_different_settings_are_refused(tmp_path):
    write_runs(tmp_path / "b1", settings={"batch_size": 1})
    write_runs(tmp_path / "b4", settings={"batch_size": 4})
    result = cli.invoke(app, ["regress", str(tmp_path), "--write-baseline", str(tmp_path / "x.json")])
    assert result.exit_code == 2
    assert "full r1 vstar-synth with different settings (batch_size=1 vs batch_size=4)" in result.output
