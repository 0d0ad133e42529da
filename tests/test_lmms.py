"""The lmms-eval plugin: registered by entry point, runs an lmms-eval task pruned, writes efficiency rows."""

from __future__ import annotations

import json

from tokbench.config import PROJECT_ROOT


def test_entry_point_registers_tokbench_model():
    from lmms_eval.models import get_model

    assert get_model("tokbench").__name__ == "TokbenchLMM"


def test_simple_evaluate_runs_pruned_with_efficiency_records(tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    efficiency = tmp_path / "eff.jsonl"
    out = simple_evaluate(
        model="tokbench",
        model_args=f"pretrained=tiny-qwen2.5-vl,method=random,budget=16,efficiency_path={efficiency}",
        tasks=["vstar_synth"],
        limit=4,
        batch_size=2,
        task_manager=TaskManager(include_path=str(PROJECT_ROOT / "tasks")),
    )
    assert "vstar_overall_acc,none" in out["results"]["vstar_synth"]
    rows = [json.loads(line) for line in efficiency.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == [0, 1, 2, 3]
    for row in rows:
        assert row["method"] == "random" and row["n_kept_input"] == 16
        assert row["retention_input"] == 16 / row["n_visual"] and row["ttft_ms"] > 0


def test_lmms_eval_judges_visual_cot_with_the_env_judge(tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("TOKBENCH_JUDGE", "exact")
    out = simple_evaluate(
        model="tokbench",
        model_args=f"pretrained=tiny-qwen2.5-vl,method=random,budget=16,efficiency_path={tmp_path / 'eff.jsonl'}",
        tasks=["visual_cot_synth"],
        limit=3,
        batch_size=1,
        gen_kwargs="max_new_tokens=4",
        task_manager=TaskManager(include_path=str(PROJECT_ROOT / "tasks")),
    )
    assert out["results"]["visual_cot_synth"]["judge_score,none"] == 0.0  # a random model never matches


def test_two_processes_shard_the_docs_and_fill_lmms_evals_efficiency_block(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m lmms_eval` on CPU (gloo): each rank runs its
    share, writes its own efficiency file, and the results carry tokbench's token counts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    accelerate = Path(sys.executable).with_name("accelerate")
    efficiency = tmp_path / "eff.jsonl"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval", "eval", "--model", "tokbench",
        "--model_args", f"pretrained=tiny-qwen2.5-vl,method=random,budget=16,efficiency_path={efficiency}",
        "--tasks", "vstar_synth", "--include_path", str(PROJECT_ROOT / "tasks"), "--limit", "5",
        "--batch_size", "2", "--log_samples", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert "Error during evaluation" not in done.stderr, done.stderr[-3000:]  # lmms-eval exits 0 regardless
    shards = [[json.loads(line) for line in (tmp_path / f"eff.jsonl.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert all(shards) and sorted(row["doc_id"] for shard in shards for row in shard) == [0, 1, 2, 3, 4]
    (results,) = (tmp_path / "out").rglob("*_results.json")
    report = json.loads(results.read_text())
    assert "vstar_overall_acc,none" in report["results"]["vstar_synth"]
    efficiency_block = report["efficiency"]["by_task"]["vstar_synth"]
    assert efficiency_block["docs_with_token_counts"] == 5
    assert efficiency_block["total_output_tokens"] >= 5
    assert efficiency_block["total_input_tokens"] > 5 * 16  # every prompt holds its 16 kept visual tokens
