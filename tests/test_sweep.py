"""tokbench/sweep.py: the grid, skipping complete cells; end to end sweep → report → regress → plot
on the tiny offline model (the two cheapest methods, 4 documents)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tokbench import sweep as sweep_module
from tokbench.cli import app
from tokbench.runner import RunConfig, RunValidationError
from tokbench.store import RunStore
from tokbench.sweep import find_complete, plan, run_sweep

cli = CliRunner()


def test_plan_puts_full_first_once():
    base = RunConfig(model="m", method="x", task="t", limit=4)
    cells = plan(base, ["random", "full", "pool", "random"], ratios=[0.25, 0.5])
    assert [(c.method, c.ratio, c.budget) for c in cells] == [
        ("full", None, None), ("random", 0.25, None), ("random", 0.5, None), ("pool", 0.25, None), ("pool", 0.5, None)
    ]
    assert all(c.limit == 4 and c.model == "m" for c in cells)
    by_budget = plan(base, ["random"], budgets=[64, 128])
    assert [(c.method, c.budget) for c in by_budget] == [("full", None), ("random", 64), ("random", 128)]
    assert [c.method for c in plan(base, ["full"])] == ["full"]
    with pytest.raises(RunValidationError, match="either --ratios or --budgets"):
        plan(base, ["random"], ratios=[0.5], budgets=[64])
    with pytest.raises(RunValidationError, match="pass --ratios"):
        plan(base, ["random"])


@dataclass
class _FakeTask:
    version: str = "1"
    n: int = 4

    def doc_ids(self):
        return list(range(self.n))


def _stored_run(config: RunConfig, n_done: int, task_version="1"):
    store = RunStore(config.output, f"{config.method}-{config.ratio}")
    store.open({**config.identity(), "method_config": {}, "task_version": task_version})
    store.update_manifest(summary={"n": n_done})
    return store.path


def test_complete_cells_are_skipped_incomplete_ones_resumed(tmp_path, monkeypatch):
    cells = plan(RunConfig(model="m", method="x", task="t", limit=4, output=str(tmp_path)), ["random"], [0.25, 0.5])
    done = _stored_run(cells[0], 4)  # full: complete
    _stored_run(cells[1], 2)  # random 0.25: half done → resumed
    _stored_run(cells[2], 4, task_version="0")  # random 0.5: another task version → rerun
    ran = []
    monkeypatch.setattr(sweep_module, "validate", lambda config, aliases=None: (None, _FakeTask()))
    monkeypatch.setattr(sweep_module, "run", lambda config, aliases, on_batch=None: ran.append(config) or
                        SimpleNamespace(run_dir=tmp_path, summary={"n": 4}))  # fmt: skip
    results = run_sweep(cells, {})
    assert [r.status for r in results] == ["skipped", "ran", "ran"]
    assert results[0].run_dir == done and results[0].summary == {"n": 4}
    assert [(c.method, c.ratio) for c in ran] == [("random", 0.25), ("random", 0.5)]
    assert find_complete(cells[0], "1", 4) == done and find_complete(cells[0], "1", 5) is None


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    cells = plan(RunConfig(model="m", method="x", task="t", output=str(tmp_path)), ["random"], [0.25])

    def run(config, aliases, on_batch=None):
        if config.method == "full":
            raise RuntimeError("out of memory")
        return SimpleNamespace(run_dir=tmp_path, summary={"n": 4})

    monkeypatch.setattr(sweep_module, "validate", lambda config, aliases=None: (None, _FakeTask()))
    monkeypatch.setattr(sweep_module, "run", run)
    results = run_sweep(cells, {})
    assert [r.status for r in results] == ["failed", "ran"] and "out of memory" in results[0].error


def test_cli_sweep_usage_errors_before_any_model_loads(tmp_path):
    args = ["sweep", "--task", "vstar-synth", "--model", "tiny-qwen2.5-vl", "--limit", "2", "-o", str(tmp_path)]
    result = cli.invoke(app, [*args, "--methods", "random,nosuchmethod", "--ratios", "0.25"])
    assert result.exit_code == 2 and "nosuchmethod" in result.output
    assert cli.invoke(app, [*args, "--methods", "random", "--ratios", "0.25,2"]).exit_code == 2
    assert cli.invoke(app, [*args, "--methods", "random", "--ratios", "a,b"]).exit_code == 2
    assert cli.invoke(app, [*args, "--methods", "random"]).exit_code == 2
    assert not any(tmp_path.iterdir())


SWEEP = ["sweep", "--methods", "random,pool", "--ratios", "0.25,0.5", "--task", "vstar-synth",
         "--model", "tiny-qwen2.5-vl", "--limit", "4", "--batch-size", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = cli.invoke(app, [*SWEEP, "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out, result


def test_sweep_report_has_one_row_per_method_budget_full_at_100(swept):
    out, result = swept
    assert result.output.count(" ran ") == 5
    report = cli.invoke(app, ["report", str(out), "--format", "json"])
    assert report.exit_code == 0, report.output
    rows = json.loads(report.stdout)
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("full", "r1"), ("pool", "r0.25"), ("pool", "r0.5"), ("random", "r0.25"), ("random", "r0.5")
    ]
    full = rows[0]
    assert full["acc_rel_full_pct"] == pytest.approx(100.0)
    assert full["retention"] == full["retention_input"] == pytest.approx(1.0)
    assert all(r["n"] == 4 and r["n_errors"] == 0 for r in rows)
    assert all(r["retention"] < 1 and r["flops_ratio_llm"] < 1 for r in rows[1:])


def test_second_sweep_skips_every_cell(swept):
    out, _ = swept
    result = cli.invoke(app, [*SWEEP, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count(" skipped ") == 5 and " ran " not in result.output


def test_sweep_regress_and_plot(swept, tmp_path):
    out, _ = swept
    baseline = tmp_path / "ci.json"
    assert cli.invoke(app, ["regress", str(out), "--write-baseline", str(baseline)]).exit_code == 0
    result = cli.invoke(app, ["regress", str(out), "--baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    data = json.loads(baseline.read_text())
    entry = next(e for e in data["entries"] if e["method"] == "pool" and e["budget"] == "r0.5")
    entry["metrics"]["accuracy"] += entry["metrics"]["accuracy_ci_halfwidth"] + 0.05
    baseline.write_text(json.dumps(data))
    result = cli.invoke(app, ["regress", str(out), "--baseline", str(baseline)])
    head = result.stdout.splitlines()[0]
    assert result.exit_code == 1 and head.startswith("### tokbench regression check: FAIL (1): pool r0.5 vstar")
    assert head.endswith(" accuracy")
    result = cli.invoke(app, ["plot", str(out), "--out", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "fig").iterdir()} >= {"accuracy_retention.png", "accuracy_retention.pdf"}


def test_cli_sweep_records_an_unreachable_cell_as_failed_and_runs_the_rest(tmp_path):
    """FastV (k=2 of 4 layers) cannot reach 0.1: that cell fails with its reason before any model loads;
    the reachable cell and `full` run."""
    args = ["sweep", "--methods", "fastv", "--ratios", "0.1,0.6", "--task", "vstar-synth", "--model", "tiny-qwen2.5-vl",
            "--limit", "1", "-o", str(tmp_path)]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "unreachable" in result.output and "k=1" in result.output
    runs = sorted(p.name.split("__")[1:3] for p in tmp_path.iterdir() if p.is_dir())
    assert runs == [["fastv", "r0.6"], ["full", "r1"]]
