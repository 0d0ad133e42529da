"""A run directory's integrity across events between a kill and the resume (issue #16), through the CLI.

Each row: an event after a run was killed with 1 of 3 docs written, the exit code and the one line that
the rerun of the same command gives, and the rows the run directory holds afterwards (each doc once).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
from test_runlock import hold
from typer.testing import CliRunner

from tokbench.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def rows():
    import datasets

    from tokbench.synth import ensure_vstar_synth

    return datasets.Dataset.from_parquet(str(ensure_vstar_synth() / "test.parquet")).select(range(4))


def _write(rows, data: Path, swap_label: bool = False) -> None:
    if swap_label:  # the target of doc 2 changes: same files, other data
        rows = rows.map(lambda row, i: {"label": "Z" if i == 2 else row["label"]}, with_indices=True)
    data.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(str(data / "test.parquet"))


def _samples(run_dir: Path) -> list[dict]:
    path = run_dir / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _enospc_on(name: str, after: int, monkeypatch) -> None:
    """fsync of a file called ``name`` fails with ENOSPC from its ``after``-th call on."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(name):
            calls.append(fd)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _nothing(**_) -> None:
    return None


def _live_lock(run_dir, **_):
    return hold(run_dir)


def _dead_lock(run_dir, **_):
    holder = hold(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def _swap_data(data, rows, **_):
    _write(rows, data, swap_label=True)


def _disk_full_mid_run(monkeypatch, **_):
    _enospc_on("samples.jsonl", after=1, monkeypatch=monkeypatch)  # doc 1 is written, doc 2 is not


def _disk_full_before(monkeypatch, **_):
    _enospc_on(".tokbench-probe", after=0, monkeypatch=monkeypatch)


@pytest.mark.parametrize(
    ("event", "exit_code", "message", "doc_ids"),
    [
        (_nothing, 0, None, [0, 1, 2]),
        (_live_lock, 1, r"is in use by pid \d+ on .*pass --wait", [0]),
        (_dead_lock, 0, None, [0, 1, 2]),
        (_swap_data, 2, r"the data of .* changed since the run started .*restore the data or use another --output", [0]),
        (_disk_full_mid_run, 1, r"no space left on the device writing .*samples.jsonl .*2 row\(s\) are saved.*rerun the same command", [0, 1]),
        (_disk_full_before, 1, r"no space left on the device for output dir .*--output DIR", [0]),
    ],
    ids=["resume", "live-lock", "dead-lock", "data-swapped", "disk-full-mid-run", "disk-full-before"],
)  # fmt: skip
def test_rerun_after_a_kill(rows, tmp_path, monkeypatch, event, exit_code, message, doc_ids):
    data, out = tmp_path / "data", tmp_path / "out"
    _write(rows, data)
    args = ["run", "--method", "random", "--ratio", "0.5", "--task", "vstar-synth", "--limit", "3",
            "--data-dir", str(data), "-o", str(out)]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    (run_dir,) = out.iterdir()
    samples = run_dir / "samples.jsonl"
    samples.write_text(samples.read_text().splitlines()[0] + "\n")  # killed after its first doc
    holder = event(run_dir=run_dir, data=data, rows=rows, monkeypatch=monkeypatch)
    try:
        result = runner.invoke(app, args)
    finally:
        if holder is not None:
            holder.stdin.close()
            holder.wait()
    monkeypatch.undo()
    assert result.exit_code == exit_code, result.output
    if message:
        (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert re.search(message, " ".join(result.output.split())), result.output
        assert "Traceback" not in result.output and line
    assert [r["doc_id"] for r in _samples(run_dir)] == doc_ids


def test_a_dataset_without_its_label_column_gives_error_rows_not_an_abort(rows, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    rows.remove_columns(["label"]).to_parquet(str(data / "test.parquet"))
    args = ["run", "--method", "random", "--ratio", "0.5", "--task", "vstar-synth", "--limit", "2",
            "--data-dir", str(data), "-o", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "2 sample(s) failed" in result.output
    (run_dir,) = out.iterdir()
    samples = _samples(run_dir)
    assert [r["doc_id"] for r in samples] == [0, 1]
    assert all(r["prediction"] is not None and r["score"] is None for r in samples)  # generation is kept
    assert all(r["error"].startswith("ScoreError: task vstar_synth cannot score doc") for r in samples)
    assert all("KeyError: 'label'" in r["error"] for r in samples)
