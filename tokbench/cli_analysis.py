"""`tokbench sweep | report | regress | plot`: the commands that run grids and read results back.

``tokbench/cli.py`` calls ``register(app)`` on its last line. This module imports ``tokbench.cli``
only inside functions: a top-level import would be circular when this module is imported first.
For the same reason ``--task`` / ``--model`` are declared here with the same flags and help as there.

Exit codes as in tokbench.cli: 0 success; 1 the job failed, or ``regress`` found a regression;
2 bad usage; 3 (sweep) some samples failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task: tokbench task or any lmms-eval task name.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Model alias (tokbench.toml), hub id or local path.")]
RunsArg = Annotated[list[Path], typer.Argument(help="Run directories, or directories holding runs (searched recursively).")]
ByOpt = Annotated[str, typer.Option("--by", help="Group by these columns (comma list): model, method, budget, task, run_id.")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output dir (default: results/).")]


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _numbers(text: str | None, kind: type, flag: str) -> list:
    try:
        return [kind(part) for part in _split(text)]
    except ValueError:
        raise typer.BadParameter(f"{flag} {text!r}: use a comma list such as {'0.25,0.5' if kind is float else '64,128'}") from None


def _reading_errors() -> tuple[type[BaseException], ...]:
    """What reading runs or a baseline raises on bad input: one line, exit 2."""
    from tokbench.regress import BaselineError
    from tokbench.report import ReportError

    return (ReportError, BaselineError, FileNotFoundError, ValueError)


# --- sweep ----------------------------------------------------------------------------------------
def sweep(
    methods: Annotated[str, typer.Option("--methods", help="Comma list of methods; `full` is always run once.")],
    task: TaskOpt,
    model: ModelOpt = "tiny-qwen2.5-vl",
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="Comma list of keep ratios, e.g. 0.111,0.25,0.5.")] = None,
    budgets: Annotated[Optional[str], typer.Option("--budgets", help="Comma list of token counts, e.g. 64,128,192.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N documents.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch.")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up iterations per cell, not recorded.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling methods.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto | bfloat16 | float16 | float32.")] = None,
    attn: Annotated[Optional[str], typer.Option("--attn", help="auto | sdpa | flash_attention_2 | eager.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Override the task's generation length.")] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="Local copy of the task's dataset.")] = None,
    output: OutputOpt = None,
    config: Annotated[Optional[Path], typer.Option(help="Extra tokbench.toml to read.")] = None,
) -> None:
    """Run methods x ratios (or budgets) on one task and model, plus `full` once; skip complete cells.

    Example: tokbench sweep --methods random,pool --ratios 0.25,0.5 --task vstar-synth --limit 8 -o results/sweep
    """
    from tokbench.cli import _fail, _usage_errors, console, out

    ratio_list, budget_list = _numbers(ratios, float, "--ratios"), _numbers(budgets, int, "--budgets")
    try:
        from tokbench.config import load_config
        from tokbench.runner import RunConfig
        from tokbench.sweep import plan

        cfg = load_config(config)
        d = cfg.defaults
        base = RunConfig(
            model=model, method="full", task=task, limit=limit,
            batch_size=batch_size if batch_size is not None else int(d.get("batch_size", 1)),
            warmup=warmup if warmup is not None else int(d.get("warmup", 0)),
            seed=seed if seed is not None else int(d.get("seed", 0)),
            dtype=dtype or d.get("dtype", "auto"),
            attn_implementation=attn or d.get("attn_implementation", "auto"),
            max_new_tokens=max_new_tokens, data_dir=data_dir,
            output=str(output or d.get("output", "results")),
        )  # fmt: skip
        from tokbench.models import resolve_model

        resolve_model(model, cfg.models)
        cells = plan(base, _split(methods), ratio_list, budget_list)
    except _usage_errors() as err:
        _fail(err, 2)
    results = _run_cells(cells, cfg.models)
    _print_cells(results)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        console.print(f"{len(failed)} cell(s) failed; rerun the same command to retry them.")
        raise typer.Exit(1)
    out.print(f"report: tokbench report {base.output}")
    if any((r.summary or {}).get("n_errors") for r in results):
        console.print("some samples failed; see the 'error' field of their rows")
        raise typer.Exit(3)


def _run_cells(cells, aliases):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokbench.cli import _fail, _usage_errors, console
    from tokbench.sweep import run_sweep

    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        ) as progress:
            bar = progress.add_task("sweep", total=None)

            def on_cell(index, config):
                label = f"[{index + 1}/{len(cells)}] {config.method} {config.make_budget().label()}"
                progress.reset(bar, total=None, description=label)

            return run_sweep(cells, aliases, on_cell, lambda done, total: progress.update(bar, completed=done, total=total),
                             usage_errors=_usage_errors())  # fmt: skip
    except _usage_errors() as err:
        _fail(err, 2)
    except KeyboardInterrupt:
        console.print("interrupted; finished batches are saved. Rerun the same command to resume.")
        raise typer.Exit(130) from None


def _print_cells(results) -> None:
    from rich.table import Table

    from tokbench.cli import out

    table = Table(title="sweep", header_style="bold")
    for column in ("cell", "status", "samples", "accuracy", "run id"):
        table.add_column(column, justify="right" if column in ("samples", "accuracy") else "left")
    for r in results:
        summary = r.summary or {}
        accuracy = summary.get("accuracy")
        table.add_row(r.label, r.status if r.status != "failed" else f"failed: {r.error}", str(summary.get("n", "—")),
                      "—" if accuracy is None else f"{accuracy:.3f}", r.run_dir.name if r.run_dir else "—")  # fmt: skip
    out.print(table)


# --- report ---------------------------------------------------------------------------------------
def report(
    runs: RunsArg,
    format: Annotated[str, typer.Option("--format", "-f", help="table | md | csv | latex | json (to stdout).")] = "table",
    by: ByOpt = "method,budget,task",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Also write report.md, report.csv, report.tex here.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Aggregate runs: accuracy (and vs `full`, with paired bootstrap 95% CIs), retention, FLOPs, TTFT, memory.

    Example: tokbench report results/sweep --format md --out results/sweep/report
    """
    from tokbench.cli import _fail, out
    from tokbench.report import RENDERERS, report as build, rich_table, write_files

    if format not in ("table", *RENDERERS):
        _fail(ValueError(f"--format {format!r}: use table, {', '.join(RENDERERS)}"), 2)
    try:
        table = build(runs, _split(by), bootstrap, seed)
    except _reading_errors() as err:
        _fail(err, 2)
    if format == "table":
        out.print(rich_table(table))
    else:
        typer.echo(RENDERERS[format](table), nl=False)
    if out_dir is not None:
        for path in write_files(table, out_dir):
            typer.echo(f"wrote {path}", err=True)


# --- regress --------------------------------------------------------------------------------------
def regress(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Current run dirs (same as --current).")] = None,
    current: Annotated[Optional[list[Path]], typer.Option("--current", "-c", help="Current run dir (repeatable).")] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="Baseline JSON, a dir of them, or a dir of runs.")] = None,
    write_baseline: Annotated[Optional[Path], typer.Option("--write-baseline", help="Write a baseline JSON from the current runs and exit.")] = None,
    tol_acc: Annotated[float, typer.Option("--tol-acc", help="Accuracy drop allowed, in points, on top of the 95% CI half-width.")] = 0.5,
    tol_ttft: Annotated[str, typer.Option("--tol-ttft", help="Relative TTFT / speedup slack, e.g. 10%.")] = "10%",
    tol_mem: Annotated[str, typer.Option("--tol-mem", help="Relative peak-memory slack, e.g. 10%.")] = "10%",
    tol_retention: Annotated[float, typer.Option("--tol-retention", help="Absolute change allowed in retention and FLOPs ratio.")] = 0.01,
    timing: Annotated[str, typer.Option(help="Compare device figures: auto (same device only) | on | off.")] = "auto",
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Do not fail on baseline cells without current runs.")] = False,
    summary: Annotated[Optional[Path], typer.Option("--summary", help="Append the markdown table to this file (e.g. $GITHUB_STEP_SUMMARY).")] = None,
) -> None:
    """Compare runs with a baseline; print a markdown table; exit 1 on a regression beyond tolerance.

    Examples:
      tokbench regress results/ci --baseline results/baselines/ci.json --tol-acc 0.5 --tol-ttft 10%
      tokbench regress results/ci --write-baseline results/baselines/ci.json
    """
    from tokbench.cli import _fail, console
    from tokbench.regress import Tolerances, compare, entries_from_runs, load_baseline, parse_fraction, to_markdown
    from tokbench.regress import write_baseline as write

    paths = [*(runs or []), *(current or [])]
    try:
        if not paths:
            raise ValueError("pass the current run dirs (tokbench regress RUN_DIR... --baseline FILE)")
        if write_baseline is not None:
            data = write(paths, write_baseline)
            console.print(f"wrote {write_baseline} ({len(data['entries'])} cells)")
            return
        if baseline is None:
            raise ValueError("pass --baseline FILE_OR_DIR (or --write-baseline FILE to make one)")
        if timing not in ("auto", "on", "off"):
            raise ValueError(f"--timing {timing!r}: use auto, on or off")
        tol = Tolerances(tol_acc, parse_fraction(tol_ttft), parse_fraction(tol_mem), tol_retention, timing, allow_missing)
        table = compare(load_baseline(baseline), entries_from_runs(paths), tol)
    except _reading_errors() as err:
        _fail(err, 2)
    text = to_markdown(table, baseline, tol)
    typer.echo(text)
    if summary is not None:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    if table["failed"].any():
        raise typer.Exit(1)


# --- plot -----------------------------------------------------------------------------------------
def plot(
    runs: RunsArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the figures.")],
    kinds: Annotated[str, typer.Option(help="Comma list: accuracy_retention, ttft_retention, pareto, memory.")] = "all",
    formats: Annotated[str, typer.Option(help="Comma list of file types.")] = "png,pdf",
) -> None:
    """Paper figures (PNG + vector PDF): accuracy and TTFT vs retention, accuracy-TTFT Pareto front, peak memory.

    Example: tokbench plot results/sweep --out figures/
    """
    from tokbench.cli import _fail, console
    from tokbench.plots import KINDS, plot as draw

    chosen = list(KINDS) if kinds == "all" else _split(kinds)
    try:
        written, skipped = draw(runs, out_dir, chosen, _split(formats))
    except _reading_errors() as err:
        _fail(err, 2)
    for note in skipped:
        console.print(f"skipped {note}")
    for path in written:
        typer.echo(str(path))


# --- html -----------------------------------------------------------------------------------------
def html(
    runs: RunsArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for index.html, plots/ and thumbs/.")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """A static HTML report (opens from disk, no server): sortable tables, figures, per-sample gallery.

    The gallery filters by method, task and correctness and shows kept-token overlays for runs made
    with --save-masks. Example: tokbench html results/sweep --out report/
    """
    from tokbench.cli import _fail, console
    from tokbench.html_report import build

    try:
        index, notes = build(runs, out_dir, bootstrap)
    except _reading_errors() as err:
        _fail(err, 2)
    for note in notes[:10]:
        console.print(f"note: {note}")
    if len(notes) > 10:
        console.print(f"note: ... and {len(notes) - 10} more")
    typer.echo(str(index))


def bench(
    model: Annotated[str, typer.Option(help="Model alias, hub id or path.")] = "tiny-qwen2.5-vl",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Real architecture, random weights.")] = False,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "random,pool,fastv,divprune,visionzip,pyramiddrop,vscan",
    ratio: Annotated[float, typer.Option(help="Retention for every method.")] = 0.4,
    image: Annotated[str, typer.Option(help="Image size WxH (noise images).")] = "448x336",
    batch: Annotated[int, typer.Option(help="Images per batch.")] = 1,
    warmup: Annotated[int, typer.Option(help="Untimed iterations first.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed iterations (median).")] = 5,
    quick: Annotated[bool, typer.Option("--quick", help="3 methods, few repeats (< 60 s on a 2-core CPU).")] = False,
) -> None:
    """Engine overhead vs plain HF, method TTFT vs an oracle drop, speedup vs FLOPs bound, memory (ratios).

    Example: tokbench bench --model qwen2.5-vl-7b --random-weights --image 1344x1008 --batch 4 --ratio 0.111
    """
    from tokbench.overhead import measure

    measure(model, random_weights, methods, ratio, image, batch, warmup, repeats, quick)


def register(app: typer.Typer) -> None:
    """Add sweep, report, regress and plot to the `tokbench` app."""
    app.command()(sweep)
    app.command()(report)
    app.command()(regress)
    app.command()(plot)
    app.command()(html)
    app.command()(bench)
