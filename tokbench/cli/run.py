"""`tokbench run | sweep`: the commands that load a model and write runs.

Exit codes: 0 success; 1 the job failed (a sweep cell crashed, predictions left unjudged); 2 bad usage;
3 the run finished but some samples failed (their rows carry ``error``); 130 / 143 interrupted.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tokbench.cli import common as c
from tokbench.cli.build import RunOptions, build_run_config, check_model, unpruned_note


def run(
    method: c.MethodOpt,
    task: c.TaskOpt,
    model: c.ModelOpt = "tiny-qwen2.5-vl",
    ratio: c.RatioOpt = None,
    budget: c.BudgetOpt = None,
    method_arg: c.MethodArgOpt = [],  # noqa: B006 - typer needs a list default
    limit: c.LimitOpt = None,
    batch_size: c.BatchSizeOpt = None,
    warmup: c.WarmupOpt = None,
    seed: c.SeedOpt = None,
    dtype: c.DtypeOpt = None,
    attn: c.AttnOpt = None,
    max_new_tokens: c.MaxNewTokensOpt = None,
    position_policy: c.PositionPolicyOpt = None,
    data_dir: c.DataDirOpt = None,
    random_weights: c.RandomWeightsOpt = False,
    max_pixels: c.MaxPixelsOpt = None,
    device_map: c.DeviceMapOpt = None,
    save_masks: c.SaveMasksOpt = False,
    efficiency: Annotated[
        bool,
        typer.Option(
            "--efficiency",
            help="GlimpsePrune's V* efficiency protocol as defaults: batch 4, 3 warm-ups, ratio 0.111, "
            "max pixels 3211264 (explicit options win).",
        ),
    ] = False,
    judge: c.JudgeOpt = None,
    judge_model: c.JudgeModelOpt = None,
    judge_key_env: c.JudgeKeyOpt = None,
    judge_concurrency: c.JudgeConcurrencyOpt = None,
    judge_timeout: c.JudgeTimeoutOpt = None,
    wait: c.WaitOpt = False,
    output: c.RunOutputOpt = None,
    config: c.ConfigOpt = None,
) -> None:
    """Run one method on one task and write DIR/<run_id>/samples.jsonl + manifest.json.

    \b
    Example:
      tokbench run --method random --ratio 0.25 --task vstar-synth --model tiny-qwen2.5-vl
    """
    options = RunOptions(
        model=model, task=task, method=method, ratio=ratio, budget=budget, method_args=_flat_args(method_arg),
        limit=limit, batch_size=batch_size, warmup=warmup, seed=seed, dtype=dtype, attn=attn,
        max_new_tokens=max_new_tokens, position_policy=position_policy, data_dir=data_dir,
        random_weights=random_weights, max_pixels=max_pixels, device_map=device_map, save_masks=save_masks,
        output=output, efficiency=efficiency, judge=judge, judge_model=judge_model, judge_key_env=judge_key_env,
        judge_concurrency=judge_concurrency, judge_timeout=judge_timeout,
    )  # fmt: skip
    try:
        from tokbench.config import load_config
        from tokbench.runner import validate
        from tokbench.store import DiskFullError

        cfg = load_config(config)
        run_config = build_run_config(options, cfg)
        c.saving_to(run_config.output)
        check_model(options, cfg)
        validate(run_config, cfg.models)
    except c.usage_errors() as err:
        c.fail(err, 2)
    except DiskFullError as err:
        c.fail(err, 1)
    note = unpruned_note(method, run_config.ratio, run_config.budget, run_config.method_args)
    if note:
        c.note(note)
    result = _execute(run_config, cfg.models, wait)
    if result.summary is None:  # a non-main process of a data-parallel run: the main one reports
        return
    from tokbench.summary import summary_table

    c.out().print(summary_table(result.summary, title=result.run_dir.name))
    c.out().print(f"results: {result.run_dir}")
    if result.summary.get("n_unscored"):
        why = result.judge_error or (result.judge and result.judge.error)
        c.note(c.unscored_message(result.run_dir, result.summary["n_unscored"], why))
        if result.judge_error or result.judge:
            raise typer.Exit(1)
    if result.summary.get("n_errors"):
        c.note(f"{result.summary['n_errors']} sample(s) failed; see the 'error' field in {result.run_dir}")
        raise typer.Exit(3)


def _flat_args(items: list[str]) -> dict[str, str]:
    """``--method-arg`` of one run: key=value only."""
    scoped = c.method_args(items)
    if set(scoped) - {""}:
        c.fail("--method-arg method:key=value is for sweeps; in a run pass key=value", 2)
    return scoped.get("", {})


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=c.err(), transient=True)  # fmt: skip


def _execute(run_config, aliases, wait: bool = False):
    from tokbench.runner import run as run_job

    try:
        with _progress() as progress:
            bar = progress.add_task(f"{run_config.method} on {run_config.task}", total=None)
            return run_job(run_config, aliases, on_batch=lambda done, total: progress.update(bar, completed=done, total=total),
                           wait=wait)
    except c.usage_errors() as err:
        c.fail(err, 2)
    except Exception as err:  # noqa: BLE001 - one line; --debug shows the traceback
        c.fail(err, 1)


def sweep(
    methods: Annotated[str, typer.Option("--methods", help="Comma list of methods; `full` is always run once.")],
    task: c.TaskOpt,
    model: c.ModelOpt = "tiny-qwen2.5-vl",
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="Comma list of keep ratios, e.g. 0.111,0.25,0.5.")] = None,
    budgets: Annotated[Optional[str], typer.Option("--budgets", help="Comma list of token counts, e.g. 64,128,192.")] = None,
    method_arg: c.MethodArgOpt = [],  # noqa: B006 - typer needs a list default
    limit: c.LimitOpt = None,
    batch_size: c.BatchSizeOpt = None,
    warmup: c.WarmupOpt = None,
    seed: c.SeedOpt = None,
    dtype: c.DtypeOpt = None,
    attn: c.AttnOpt = None,
    max_new_tokens: c.MaxNewTokensOpt = None,
    position_policy: c.PositionPolicyOpt = None,
    max_pixels: c.MaxPixelsOpt = None,
    device_map: c.DeviceMapOpt = None,
    data_dir: c.DataDirOpt = None,
    random_weights: c.RandomWeightsOpt = False,
    save_masks: c.SaveMasksOpt = False,
    judge: c.JudgeOpt = None,
    judge_model: c.JudgeModelOpt = None,
    judge_key_env: c.JudgeKeyOpt = None,
    judge_concurrency: c.JudgeConcurrencyOpt = None,
    judge_timeout: c.JudgeTimeoutOpt = None,
    output: c.RunOutputOpt = None,
    config: c.ConfigOpt = None,
) -> None:
    """Run methods x ratios (or budgets) on one task and model, plus `full` once; skip complete cells.

    \b
    Examples:
      tokbench sweep --methods random,pool --ratios 0.25,0.5 --task vstar-synth --limit 8 -o results/sweep
      tokbench sweep --methods fastv,pyramiddrop --ratios 0.5 --method-arg fastv:k=1 --task vstar-synth --limit 8
    """
    names = c.split(methods)
    ratio_list, budget_list = c.numbers(ratios, float, "--ratios"), c.numbers(budgets, int, "--budgets")
    scoped_args = c.method_args(method_arg, names)
    options = RunOptions(
        model=model, task=task, limit=limit, batch_size=batch_size, warmup=warmup, seed=seed, dtype=dtype,
        attn=attn, max_new_tokens=max_new_tokens, position_policy=position_policy, max_pixels=max_pixels,
        device_map=device_map, data_dir=data_dir, random_weights=random_weights, save_masks=save_masks, output=output, judge=judge,
        judge_model=judge_model, judge_key_env=judge_key_env, judge_concurrency=judge_concurrency,
        judge_timeout=judge_timeout,
    )  # fmt: skip
    try:
        from tokbench.config import load_config
        from tokbench.sweep import plan

        cfg = load_config(config)
        base = build_run_config(options, cfg)
        c.saving_to(base.output)
        check_model(options, cfg)
        cells = plan(base, names, ratio_list, budget_list, scoped_args)
    except c.usage_errors() as err:
        c.fail(err, 2)
    results = _run_cells(cells, cfg.models)
    _print_cells(results)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        c.note(f"{len(failed)} cell(s) failed; rerun the same command to retry them.")
        raise typer.Exit(1)
    c.out().print(f"report: tokbench report {base.output}")
    if any((r.summary or {}).get("n_errors") for r in results):
        c.note("some samples failed; see the 'error' field of their rows")
        raise typer.Exit(3)


def _run_cells(cells, aliases):
    from tokbench.pruner import budget_label
    from tokbench.sweep import run_sweep

    try:
        with _progress() as progress:
            bar = progress.add_task("sweep", total=None)

            def on_cell(index, config):
                label = f"[{index + 1}/{len(cells)}] {config.method} {budget_label(config.make_budget())}"
                progress.reset(bar, total=None, description=label)

            return run_sweep(cells, aliases, on_cell, lambda done, total: progress.update(bar, completed=done, total=total),
                             usage_errors=c.usage_errors())  # fmt: skip
    except c.usage_errors() as err:
        c.fail(err, 2)


def _print_cells(results) -> None:
    from rich.table import Table

    table = Table(title="sweep", header_style="bold")
    for column in ("cell", "status", "samples", "accuracy", "run id"):
        table.add_column(column, justify="right" if column in ("samples", "accuracy") else "left")
    for r in results:
        summary = r.summary or {}
        accuracy = summary.get("accuracy")
        table.add_row(r.label, r.status if r.status != "failed" else f"failed: {r.error}", str(summary.get("n", "—")),
                      "—" if accuracy is None else f"{accuracy:.3f}", r.run_dir.name if r.run_dir else "—")  # fmt: skip
    c.out().print(table)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(sweep)
