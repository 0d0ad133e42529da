"""End-to-end CLI runs on the tiny models, offline, and the one-line errors for bad usage."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_FAMILY_MODELS
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.models import family_names
from tokbench.store import SAMPLE_FIELDS

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("model", TINY_FAMILY_MODELS)
def test_run_writes_samples_and_manifest(tmp_path, model):
    result = _run(
        "run", "--method", "random", "--budget", "16", "--task", "vstar-synth", "--model", model,
        "--limit", "4", "--batch-size", "2", "--warmup", "1", "--output", str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["doc_id"] for r in rows} == set(range(4)) or len({r["doc_id"] for r in rows}) == 4
    for row in rows:
        assert set(SAMPLE_FIELDS) <= row.keys()
        assert row["error"] is None
        assert row["n_kept_input"] == 16
        assert row["retention_input"] == pytest.approx(16 / row["n_visual"])
        assert row["kept_per_layer"] == [16] * len(row["kept_per_layer"])
        assert row["score"] in (0.0, 1.0)
        assert row["ttft_ms"] > 0 and 0 < row["flops_ratio_llm"] < 1 and row["flops_ratio_total"] > 0
        assert row["batch_size"] == 2 and row["model"] == model and row["method"] == "random"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["method"] == "random" and manifest["config"]["budget"] == 16
    assert manifest["summary"]["n"] == 4
    assert "torch" in manifest["environment"] and manifest["model"]["family"] in family_names()
    assert "accuracy" in result.output


def test_rerun_resumes_without_duplicates(tmp_path):
    args = ["run", "--method", "full", "--task", "vstar-synth", "--model", "tiny-qwen2.5-vl", "--output", str(tmp_path)]
    assert _run(*args, "--limit", "2").exit_code == 0
    assert _run(*args, "--limit", "2").exit_code == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_unknown_method_lists_known_ones(tmp_path):
    result = _run("run", "--method", "nope", "--task", "vstar-synth", "--output", str(tmp_path))
    for name in ("full", "random", "fastv", "pool", "downsample"):
        assert name in result.output


def test_list_commands():
    methods = _run("list", "methods")
    assert methods.exit_code == 0 and "fastv" in methods.output.split()
    models = _run("list", "models")
    assert "tiny-llava" in models.output and "Qwen/Qwen2.5-VL-7B-Instruct" in models.output
    tasks = _run("list", "tasks")
    assert tasks.exit_code == 0 and "vstar-synth" in tasks.output


def test_efficiency_protocol_defaults(tmp_path):
    result = _run("run", "--efficiency", "--method", "random", "--task", "vstar-synth", "--limit", "4",
                  "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["ratio"] == 0.111 and manifest["config"]["max_pixels"] == 3211264
    assert manifest["settings"]["batch_size"] == 4 and manifest["settings"]["warmup"] == 3
