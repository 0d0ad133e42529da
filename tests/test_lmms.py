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
