"""Data-parallel runs through accelerate: shards merge into one run, every document exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.store import RunStore

ARGS = ["run", "--method", "random", "--ratio", "0.5", "--task", "vstar-synth", "--limit", "7", "--batch-size", "2"]


def _rows(out: Path) -> list[dict]:
    (run_dir,) = out.iterdir()
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tokbench"]  # fmt: skip
    two = subprocess.run(
        [*launch, *ARGS, "-o", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = CliRunner().invoke(app, [*ARGS, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    rows_two, rows_one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["doc_id"] for r in rows_two] == list(range(7))  # each document once, in order
    assert [r["prediction"] for r in rows_two] == [r["prediction"] for r in rows_one]
    assert [r["n_kept_input"] for r in rows_two] == [r["n_kept_input"] for r in rows_one]
    (run_dir,) = (tmp_path / "two").iterdir()
    assert not list(run_dir.glob("samples.rank*.jsonl"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["settings"]["processes"] == 2 and manifest["summary"]["n"] == 7


def test_merge_shards_keeps_each_doc_once(tmp_path):
    store = RunStore(tmp_path, "run")
    store.open({"x": 1})
    store.append([{"doc_id": 0, "prediction": "kept"}])
    RunStore(tmp_path, "run", rank=0).append([{"doc_id": 2, "prediction": "a"}, {"doc_id": 0, "prediction": "dup"}])
    RunStore(tmp_path, "run", rank=1).append([{"doc_id": 1, "prediction": "b"}, {"doc_id": 2, "prediction": "dup"}])
    assert store.merge_shards() == 2
    assert [(r["doc_id"], r["prediction"]) for r in store.records()] == [(0, "kept"), (1, "b"), (2, "a")]
    assert not list(store.path.glob("samples.rank*"))
