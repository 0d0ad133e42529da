"""Every bad input of docs/errors.md, table-driven: usage errors exit 2 with one line before any model
loads; per-sample problems become that sample's error row, the run goes on and exits 3."""

from __future__ import annotations

import json

import datasets
import pytest
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.synth import ensure_vstar_synth

runner = CliRunner()

USAGE = [  # (extra args, message)
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "fastvv"], "did you mean fastv"),
    (["--ratio", "1.5"], "outside (0, 1]"),
    (["--ratio", "0"], "outside (0, 1]"),
    (["--budget", "0"], ">= 1"),
    (["--ratio", "0.5", "--budget", "8"], "either --ratio or --budget"),
    (["--method", "fastv", "--method-arg", "layer=3"], "does not accept argument 'layer'"),
    (["--task", "vstar-synht"], "did you mean vstar-synth"),
    (["--model", "tiny-qwen"], "unknown model"),
    (["--model", "./missing/model"], "unknown model"),
    (["--batch-size", "0"], "batch size 0 must be >= 1"),
    (["--limit", "0"], "limit 0 must be >= 1"),
    (["--position-policy", "shift"], "use keep or reindex"),
    (["--data-dir", "/no/such/dir"], "no test.parquet in /no/such/dir"),
    (["--task", "gqa", "--data-dir", "/no/such/dir"], "does not exist"),
    (["--task", "visual_cot"], "pass --data-dir with the viscot_benchmark folder"),
    (["--task", "visual-cot-synth", "--judge", "gpt-4"], "unknown judge 'gpt-4'"),
    (["--task", "visual-cot-synth", "--judge", "http://127.0.0.1:9/v1"], "needs --judge-model"),
    (["--config", "BAD_TOML"], "fix the TOML syntax"),
    (["--output", "UNWRITABLE"], "not writable"),
]


@pytest.mark.parametrize(("extra", "message"), USAGE, ids=[m for _, m in USAGE])
def test_bad_usage_is_one_line_and_exit_2(tmp_path, extra, message):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[models\nx = 1\n")
    (tmp_path / "a-file").write_text("")
    extra = [{"BAD_TOML": str(bad_toml), "UNWRITABLE": str(tmp_path / "a-file" / "sub")}.get(a, a) for a in extra]
    args = {"--method": "random", "--task": "vstar-synth", "--model": "tiny-qwen2.5-vl", "--output": str(tmp_path)}
    args.update(zip(extra[::2], extra[1::2]))  # every case is option/value pairs
    result = runner.invoke(app, ["run", *[x for pair in args.items() for x in pair]])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """vstar-synth's first 5 rows with doc 1's image corrupt, doc 2's question empty, doc 3's question
    longer than tiny-llava's 2048-token context and doc 4's image missing on disk."""
    out = tmp_path_factory.mktemp("bad-data")
    table = datasets.Dataset.from_parquet(str(ensure_vstar_synth() / "test.parquet")).select(range(5))
    table = table.cast_column("image", datasets.Image(decode=False))
    rows = table.to_list()
    rows[1]["image"] = {"bytes": b"not a png", "path": "corrupt.png"}
    rows[2]["text"] = "   "
    rows[3]["text"] = "Describe every pixel. " * 120
    gone = out / "gone.png"
    gone.write_bytes(rows[0]["image"]["bytes"])  # present while the table is written, then removed
    rows[4]["image"] = {"bytes": None, "path": str(gone)}
    features = datasets.Features({**table.features, "image": datasets.Image()})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(out / "test.parquet"))
    gone.unlink()
    return out


PER_SAMPLE = {1: "corrupt.png", 2: "empty question", 3: "exceeds the model's context of 2048", 4: "gone.png"}


def test_bad_samples_fail_alone_and_the_run_exits_3(tmp_path, bad_data):
    args = ["run", "--method", "random", "--budget", "16", "--task", "vstar-synth", "--model", "tiny-llava",
            "--data-dir", str(bad_data), "--batch-size", "5", "--output", str(tmp_path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "4 sample(s) failed" in result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = {r["doc_id"]: r for r in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines())}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert rows[0]["error"] is None and rows[0]["prediction"] is not None
    for doc_id, message in PER_SAMPLE.items():
        assert message in rows[doc_id]["error"], rows[doc_id]["error"]
    summary = json.loads((run_dir / "manifest.json").read_text())["summary"]
    assert summary["n"] == 5 and summary["n_errors"] == 4


def test_budget_above_the_image_tokens_fails_each_sample(tmp_path):
    args = ["run", "--method", "random", "--budget", "5000", "--task", "vstar-synth", "--limit", "2",
            "--output", str(tmp_path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("budget 5000" in r["error"] for r in rows)
