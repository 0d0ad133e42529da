"""Visual-CoT task hooks for lmms-eval: data, prompt, judge scoring and the per-subset mean.

Prompt: the question alone (no pre/post prompt; GlimpsePrune's free-form setting). Scoring: the LLM
judge of ``tokbench.judge``. ``tokbench run`` judges all predictions after generation (concurrently,
cached) and never calls ``process_results``; plain ``lmms-eval`` calls it per document, with the judge
taken from ``$TOKBENCH_JUDGE`` (URL, ``exact`` or ``local-hf:PATH``), ``$TOKBENCH_JUDGE_MODEL`` and
``$TOKBENCH_JUDGE_KEY_ENV``.
"""

from __future__ import annotations

import os
from functools import lru_cache

PLACEHOLDER_COLUMN = "tokbench_placeholder"


def process_docs(dataset):
    """Swap a task's one-row placeholder for its table; a table passed by ``tokbench run`` passes through."""
    if PLACEHOLDER_COLUMN not in dataset.column_names:
        return dataset
    import datasets

    from tokbench.synth import data_root, quiet_datasets
    from tokbench.synth.visual_cot import ensure_visual_cot_synth
    from tokbench.visual_cot import VisualCoTError, build_table, subsets_for

    name = dataset[0][PLACEHOLDER_COLUMN]
    if name == "visual_cot_synth":
        source = ensure_visual_cot_synth()
    elif os.environ.get("TOKBENCH_VISUAL_COT_DIR"):
        source = os.environ["TOKBENCH_VISUAL_COT_DIR"]
    else:
        raise VisualCoTError(f"task {name}: set TOKBENCH_VISUAL_COT_DIR to the viscot_benchmark folder and its images")
    path = build_table(source, subsets_for(name))
    with quiet_datasets():
        return datasets.Dataset.from_parquet(str(path), cache_dir=str(data_root() / "hf-datasets"))


def doc_to_visual(doc):
    """The record's image, decoded from its path by ``tokbench.images.decode_image`` (strict; a missing,
    truncated or corrupt file fails this document only; downscaled within ``tokbench run``'s pixel budget)."""
    from tokbench.images import decode_image

    return [decode_image(doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


@lru_cache(maxsize=1)
def _env_judge():
    from tokbench.judge import JudgeConfig, build_judge

    config = JudgeConfig(
        judge=os.environ.get("TOKBENCH_JUDGE"),
        model=os.environ.get("TOKBENCH_JUDGE_MODEL"),
        key_env=os.environ.get("TOKBENCH_JUDGE_KEY_ENV", "OPENAI_API_KEY"),
    )
    return build_judge(config)


def process_results(doc, results):
    """One judged answer: ``{"judge_score": {"subset", "score", "judge", "reply"}}``."""
    from tokbench.judge import parse_score

    judge = _env_judge()
    reply = judge.reply(doc["question"], doc["answer"], results[0])
    return {"judge_score": {"subset": doc["subset"], "score": parse_score(reply), "judge": judge.name, "reply": reply}}


def mean_over_subsets(items):
    """Mean score per subset, then the unweighted mean over subsets (the Visual-CoT table's average)."""
    from tokbench.summary import mean_over_subsets as mean

    return mean([(item["subset"], item["score"]) for item in items])
