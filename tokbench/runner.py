"""One run = model x method x budget x task: validate, load, warm up, batches, per-sample records, resume.

Everything that can be checked without the model (method, its arguments, budget, task, output dir)
is checked first, so a typo costs a second rather than a model load. Records are appended and flushed
per batch; rerunning with the same output dir and settings skips the documents already done.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tokbench.judge import JudgeConfig, JudgeError, JudgeReport
from tokbench.pruner import Budget, BudgetError, budget_label, build_method, method_config, plan_stages


@dataclass
class RunConfig:
    """Everything that defines a run's results (the manifest stores it to rerun)."""

    model: str
    method: str
    task: str
    ratio: float | None = None
    budget: int | None = None
    method_args: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    batch_size: int = 1
    warmup: int = 0
    seed: int = 0
    dtype: str = "auto"
    attn_implementation: str = "auto"
    max_new_tokens: int | None = None
    position_policy: str | None = None
    data_dir: str | None = None
    random_weights: bool = False
    max_pixels: int | None = None
    device_map: str | None = None  # --device-map: placement only, so not part of the run's identity
    save_masks: bool = False
    judge: JudgeConfig | None = None  # judged tasks (Visual-CoT): scores predictions after generation
    output: str = "results"

    def make_budget(self) -> Budget | None:
        """The budget given, or None when neither --ratio nor --budget was (the method's own default)."""
        if self.ratio is not None and self.budget is not None:
            raise BudgetError("pass either --ratio or --budget, not both")
        if self.budget is not None:
            return Budget.tokens(self.budget)
        if self.ratio is not None:
            return Budget.ratio(self.ratio)
        return None

    def identity(self) -> dict[str, Any]:
        """The settings that change predictions (not output dir, batch size, warm-up, masks or judge)."""
        skip = {"output", "batch_size", "warmup", "save_masks", "judge", "device_map"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any] | None  # None on the non-main processes of a data-parallel run
    judge: JudgeReport | None = None  # judged tasks, when a judge was given
    judge_error: str | None = None  # the judge could not be used (bad key, unknown model)


class RunValidationError(ValueError):
    """Settings that cannot run, found before the model loads."""


def validate(config: RunConfig, aliases: dict[str, str] | None = None):
    """Check everything that can be checked without weights; raises one-line errors. Returns (method, task).

    With ``aliases`` (tokbench.toml's model aliases) the model is checked too, from its config alone:
    it resolves, its config is readable, and the method's stages fit it (layers in range, method
    arguments valid, the budget reachable; a method's own weights load). Nothing is written on failure.
    """
    from tokbench.models import check_load_options, resolve_device_map
    from tokbench.tasks import load_task

    if config.batch_size < 1:
        raise RunValidationError(f"batch size {config.batch_size} must be >= 1")
    if config.limit is not None and config.limit < 1:
        raise RunValidationError(f"limit {config.limit} must be >= 1")
    if config.position_policy not in (None, "keep", "reindex"):
        raise RunValidationError(f"position policy {config.position_policy!r}: use keep or reindex")
    check_load_options(config.dtype, config.attn_implementation)
    resolve_device_map(config.device_map, "cpu")  # auto/balanced/sequential or a readable JSON map
    method = build_method(config.method, config.make_budget(), config.method_args)
    if aliases is not None:
        from tokbench.models.config_info import config_info

        plan_stages(method, config_info(config.model, aliases, config.random_weights))
    task = load_task(config.task, data_dir=config.data_dir, limit=config.limit)
    if task.judged and config.judge is not None and config.judge.judge:
        from tokbench.judge import check_judge

        check_judge(config.judge)
    out = Path(config.output)
    from tokbench.store import probe_output_dir

    try:
        probe_output_dir(out)  # a full disk raises its own one-line DiskFullError
    except OSError as err:
        raise RunValidationError(f"output dir {out} is not writable ({err.strerror}); pass --output DIR") from None
    return method, task


def run(
    config: RunConfig,
    aliases: dict[str, str],
    on_batch: Callable[[int, int], None] | None = None,
    wait: bool = False,
) -> RunResult:
    """Execute ``config``; ``on_batch(done, total)`` reports progress.

    The run directory is locked for the whole run (``tokbench.runlock``): a second run into it raises
    ``RunLockedError`` naming the holder, or with ``wait`` starts when the holder finishes. A full output
    disk raises ``DiskFullError`` before the model loads, or mid-run with every finished batch kept.

    Under ``accelerate launch`` (several processes) each rank takes every world-size-th remaining
    document and writes its own shard; the main process merges the shards into one run and returns
    the summary (the other ranks return ``summary=None``). Rank 0 holds the lock for all of them.
    """
    from tokbench.runlock import RunLock
    from tokbench.store import RunStore, make_run_id

    method, task = validate(config, aliases)
    identity = config.identity()
    run_id = make_run_id(
        {**identity, "method_config": method_config(method), "budget_label": budget_label(method.budget)}
    )
    store = RunStore(Path(config.output), run_id)
    state = _distributed_state()
    rank = state.process_index if state else 0
    with RunLock(store.path, wait=wait) if rank == 0 else contextlib.nullcontext():
        return _run_locked(config, aliases, on_batch, method, task, store, state)


def _run_locked(config: RunConfig, aliases, on_batch, method, task, store, state) -> RunResult:
    """``run`` once the run directory is this process's: open or resume, generate, summarise, judge."""
    from tokbench.engine import Engine
    from tokbench.fingerprint import data_fingerprint
    from tokbench.models import load_model
    from tokbench.store import RunStore

    identity, run_id = config.identity(), store.run_id
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if rank == 0:
        store.open(
            {**identity, "method_config": method_config(method), "task_version": task.version},
            data=data_fingerprint(task),
        )
        store.merge_shards()  # left by an interrupted data-parallel run
        settings = {k: getattr(config, k) for k in ("output", "batch_size", "warmup", "save_masks")}
        judge = asdict(config.judge) if config.judge else None
        store.update_manifest(settings={**settings, "judge": judge, "processes": world})
    if state:
        state.wait_for_everyone()
    todo = [d for d in task.doc_ids() if d not in store.done_doc_ids()][rank::world]
    writer = store if world == 1 else RunStore(store.root, run_id, rank=rank)
    with state.main_process_first() if state else contextlib.nullcontext():  # one rank builds caches
        adapter = load_model(
            config.model,
            aliases,
            dtype=config.dtype,
            attn_implementation=config.attn_implementation,
            device=str(state.device) if state and state.device.type != "cpu" else None,
            random_weights=config.random_weights,
            max_pixels=config.max_pixels,
            device_map=config.device_map,
        )
    if rank == 0:
        store.update_manifest(model=adapter.describe())
    engine = Engine(adapter, method, config.position_policy, seed=config.seed, record_kept=config.save_masks)
    max_new = config.max_new_tokens or int(task.gen_kwargs.get("max_new_tokens", 16))
    recorder = _Recorder(config, method, adapter, run_id, task)
    batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    if batches and config.warmup:
        docs, _ = _load_docs(task, batches[0], recorder.max_pixels)
        for _ in range(config.warmup):
            if docs:
                engine.generate([d.images for d in docs], [d.prompt for d in docs], [d.doc_id for d in docs], max_new)
    for done, doc_ids in enumerate(batches, start=1):
        writer.append(recorder.run_batch(engine, doc_ids, max_new))
        if on_batch:
            on_batch(done, len(batches))
    if state:
        state.wait_for_everyone()
        if rank != 0:
            return RunResult(store.path, None)
        store.merge_shards()
    from tokbench.summary import summarize

    summary = summarize(store.records())
    store.update_manifest(summary=summary)
    result = RunResult(store.path, summary)
    if task.judged and config.judge is not None and config.judge.judge:
        _judge(result, config.judge)
    return result


def _distributed_state():
    """accelerate's process state when launched as several processes (``accelerate launch``), else None.

    CPU-only processes use the gloo backend (accelerate's MULTI_CPU); GPUs one device per process.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _judge(result: RunResult, judge_config: JudgeConfig) -> None:
    """Score the run's predictions; a judge that cannot be used leaves them saved and unscored."""
    from tokbench.judge import build_judge, judge_run

    try:
        result.judge = judge_run(result.run_dir, build_judge(judge_config), judge_config.concurrency)
    except JudgeError as err:
        result.judge_error = str(err)
    from tokbench.store import RunStore

    result.summary = RunStore(result.run_dir.parent, result.run_dir.name).read_manifest().summary


def _score(task, doc_id: int, prediction: str) -> tuple[dict[str, float], str | None]:
    """The task's scores for one prediction, or ({}, error) when scoring fails (e.g. the dataset lacks the
    label column ``process_results`` reads): the row keeps its prediction and the run goes on."""
    from tokbench.tasks import _one_line, _unwrap_retry

    try:
        return task.score(doc_id, prediction), None
    except Exception as err:  # noqa: BLE001 - a doc that cannot be scored is its own error row
        return {}, f"ScoreError: task {task.name} cannot score doc {doc_id}: {_one_line(_unwrap_retry(err))}"


def _load_docs(task, doc_ids: list[int], max_pixels: int | None = None):
    """Load documents, images decoded within the model's pixel budget (``tokbench.images``); a missing or
    corrupt one becomes an error instead of stopping the batch."""
    docs, errors = [], {}
    for doc_id in doc_ids:
        try:
            docs.append(task.doc(doc_id, max_pixels=max_pixels))
        except Exception as err:  # noqa: BLE001 - any bad document is isolated to its own row
            errors[doc_id] = f"{type(err).__name__}: {err}"
    return docs, errors


class _Recorder:
    """Turns engine outputs into DESIGN.md result rows (the one place that computes each figure)."""

    def __init__(self, config: RunConfig, method, adapter, run_id: str, task):
        from tokbench.images import max_pixels_of
        from tokbench.metrics import LLMShape

        self.config = config
        self.method = method
        self.adapter = adapter
        self.run_id = run_id
        self.task = task
        self.shape = LLMShape.from_config(adapter.text_config)
        self.max_pixels = max_pixels_of(adapter)  # images decode no larger than the model will see
        self.headline = getattr(method, "headline_retention", "input")
        self.base = {
            "run_id": run_id,
            "model": config.model,
            "method": config.method,
            "budget": budget_label(method.budget),
            "task": task.name,
        }

    def run_batch(self, engine, doc_ids: list[int], max_new: int) -> list[dict[str, Any]]:
        docs, errors = _load_docs(self.task, doc_ids, self.max_pixels)
        rows = [self._error_row(d, msg, len(doc_ids)) for d, msg in errors.items()]
        return rows + self._generate(engine, docs, max_new) if docs else rows

    def _generate(self, engine, docs, max_new: int) -> list[dict[str, Any]]:
        """Rows for ``docs``; on CUDA OOM the batch is retried in halves down to 1, then recorded as failed."""
        import torch

        from tokbench.engine import ContextLengthError
        from tokbench.metrics import PeakMemory

        try:
            with PeakMemory(self.adapter.device) as memory:
                out = engine.generate([d.images for d in docs], [d.prompt for d in docs], [d.doc_id for d in docs], max_new)
        except ContextLengthError as err:  # those samples fail alone; the rest of the batch runs
            rest = [d for d in docs if d.doc_id not in err.doc_ids]
            failed = [self._error_row(d, f"ContextLengthError: {err}", len(docs)) for d in err.doc_ids]
            return failed + (self._generate(engine, rest, max_new) if rest else [])
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(docs) == 1:
                message = "CUDA out of memory at batch size 1; lower --max-pixels or use a smaller model/dtype"
                return [self._error_row(docs[0].doc_id, message, 1)]
            half = len(docs) // 2
            return self._generate(engine, docs[:half], max_new) + self._generate(engine, docs[half:], max_new)
        except Exception as err:  # noqa: BLE001 - a failing batch is recorded, the run goes on
            return [self._error_row(d.doc_id, f"{type(err).__name__}: {err}", len(docs)) for d in docs]
        return [self._row(doc, sample, out, memory) for doc, sample in zip(docs, out.samples)]

    def _row(self, doc, sample, out, memory) -> dict[str, Any]:
        from tokbench.records import efficiency_fields

        scores, score_error = ({}, None) if self.task.judged else _score(self.task, doc.doc_id, sample.text)
        row = {
            **self.base,
            "doc_id": doc.doc_id,
            "prediction": sample.text,
            "target": doc.target,
            "score": scores.get("score"),
            **efficiency_fields(sample, out, memory, self.shape, self.headline, self.adapter.dtype.itemsize),
            "error": score_error,
        }
        if self.config.save_masks:  # enough to draw the overlay later (tokbench show RUN_DIR, tokbench html)
            row["kept_index"] = sample.kept_index
            row["token_tiles"] = [[tile.as_row() for tile in tiles] for tiles in sample.token_tiles]
            row["image_sizes"] = [list(image.info.get("tokbench_original_size", image.size)) for image in doc.images]
        if self.task.judged:  # scored later by tokbench.judge (judge_run)
            row.update(question=doc.meta.get("question", doc.prompt), subset=doc.meta.get("subset"), judge=None)
        return row

    def _error_row(self, doc_id: int, message: str, batch_size: int) -> dict[str, Any]:
        return {**self.base, "doc_id": doc_id, "batch_size": batch_size, "error": message}
