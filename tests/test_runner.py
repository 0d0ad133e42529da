"""Runner reliability: per-sample isolation, OOM back-off (injected), resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from tokbench.config import load_config
from tokbench.engine import Engine
from tokbench.runner import RunConfig, run


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_oom_halves_the_batch_then_fails_only_the_sample(tmp_path, monkeypatch):
    real = Engine.generate
    sizes = []

    def flaky(self, images, questions, doc_ids, max_new_tokens=16):
        sizes.append(len(doc_ids))
        if len(doc_ids) > 1 or doc_ids == [2]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, images, questions, doc_ids, max_new_tokens)

    monkeypatch.setattr(Engine, "generate", flaky)
    config = RunConfig(model="tiny-qwen2.5-vl", method="random", task="vstar-synth", ratio=0.5, limit=4,
                       batch_size=4, output=str(tmp_path))
    result = run(config, load_config().models)
    rows = {r["doc_id"]: r for r in _rows(result.run_dir)}
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert sorted(rows) == [0, 1, 2, 3]
    assert "out of memory at batch size 1" in rows[2]["error"]
    assert all(rows[d]["error"] is None and rows[d]["batch_size"] == 1 for d in (0, 1, 3))
    assert result.summary["n_errors"] == 1


def test_corrupt_image_yields_one_error_row(tmp_path, monkeypatch):
    from tokbench import tasks

    real = tasks.Task.doc

    def doc(self, doc_id, max_pixels=None):
        if doc_id == 1:
            raise tasks.DocError("task vstar_synth doc 1: cannot read image images/00001.png")
        return real(self, doc_id, max_pixels)

    monkeypatch.setattr(tasks.Task, "doc", doc)
    config = RunConfig(model="tiny-llava", method="full", task="vstar-synth", limit=3, batch_size=2,
                       output=str(tmp_path))
    result = run(config, load_config().models)
    rows = {r["doc_id"]: r for r in _rows(result.run_dir)}
    assert sorted(rows) == [0, 1, 2]
    assert "cannot read image" in rows[1]["error"] and rows[0]["error"] is None and rows[2]["error"] is None


def test_sigkill_then_resume_gives_each_doc_once_and_same_predictions(tmp_path):
    args = ["run", "--method", "random", "--ratio", "0.5", "--task", "vstar-synth", "--model", "tiny-qwen2.5-vl",
            "--limit", "12", "--batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tokbench", *args, "--output", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        files = list(killed.glob("*/samples.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-m", "tokbench", *args, "--output", str(killed)], env=env, check=True,
                   capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "tokbench", *args, "--output", str(clean)], env=env, check=True,
                   capture_output=True)
    (resumed_dir,) = killed.iterdir()
    (clean_dir,) = clean.iterdir()
    resumed = {r["doc_id"]: r["prediction"] for r in _rows(resumed_dir)}
    assert len(_rows(resumed_dir)) == 12 and sorted(resumed) == list(range(12))
    assert resumed == {r["doc_id"]: r["prediction"] for r in _rows(clean_dir)}
