"""`tokbench report | regress | plot | html`: read runs back (no model is loaded).

Exit codes: 0 success; 1 ``regress`` found a regression; 2 bad usage (unreadable runs or baseline, an
output that cannot be written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokbench.cli import common as c
from tokbench.cli.table import fit_report

ByOpt = Annotated[str, typer.Option("--by", help="Group by these columns (comma list): model, method, budget, task, run_id.")]


def _reading_errors() -> tuple[type[BaseException], ...]:
    """What reading runs or a baseline raises on bad input: one line, exit 2."""
    from tokbench.regress import BaselineError
    from tokbench.report import ReportError

    return (ReportError, BaselineError, FileNotFoundError, ValueError)


def report(
    runs: c.RunsArg,
    format: Annotated[
        Optional[str],
        typer.Option("--format", "-f", help="table | md | csv | latex | json (default: table on a terminal, md otherwise)."),
    ] = None,
    columns: Annotated[
        Optional[str],
        typer.Option("--columns", help="Table columns (comma list of headers, or all); default: those that fit the terminal."),
    ] = None,
    by: ByOpt = "method,budget,task",
    output: Annotated[Optional[Path], c.output_option("Also write report.md, report.csv, report.tex here.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Aggregate runs: accuracy (and vs `full`, with paired bootstrap 95% CIs), retention, FLOPs, TTFT, memory.

    \b
    Example:
      tokbench report results/sweep --format md --output results/sweep/report
    """
    import sys

    from tokbench.report import RENDERERS, report as build, write_files

    chosen = format or ("table" if sys.stdout.isatty() else "md")
    if chosen not in ("table", *RENDERERS):
        c.fail(f"--format {chosen!r}: use table, {', '.join(RENDERERS)}", 2)
    if output is not None:
        c.writable_dir(output)
    try:
        table = build(runs, c.split(by), bootstrap, seed)
    except _reading_errors() as err:
        c.fail(err, 2)
    if chosen == "table":
        console = c.out()
        rendered, hidden = fit_report(table, c.split(columns) if columns else None, console.width)
        console.print(rendered)
        if hidden:
            c.note(f"{len(hidden)} column(s) hidden to fit {console.width} columns ({', '.join(hidden)}); "
                   "--columns all or --format md shows them")  # fmt: skip
    else:
        typer.echo(RENDERERS[chosen](table), nl=False)
    if output is not None:
        try:
            written = write_files(table, output)
        except OSError as err:
            c.fail(f"--output {output} is not writable ({err.strerror or err}); pass --output DIR", 2)
        for path in written:
            c.note(f"wrote {path}")


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

    \b
    Examples:
      tokbench regress results/ci --baseline results/baselines/ci.json --tol-acc 0.5 --tol-ttft 10%
      tokbench regress results/ci --write-baseline results/baselines/ci.json
    """
    from tokbench.regress import Tolerances, compare, entries_from_runs, load_baseline, parse_fraction, to_markdown
    from tokbench.regress import write_baseline as write

    paths = [*(runs or []), *(current or [])]
    if summary is not None:
        c.writable_file(summary, "--summary")
    try:
        if not paths:
            raise ValueError("pass the current run dirs (tokbench regress RUN_DIR... --baseline FILE)")
        if write_baseline is not None:
            c.writable_file(write_baseline, "--write-baseline")
            data = write(paths, write_baseline)
            c.note(f"wrote {write_baseline} ({len(data['entries'])} cells)")
            return
        if baseline is None:
            raise ValueError("pass --baseline FILE_OR_DIR (or --write-baseline FILE to make one)")
        if timing not in ("auto", "on", "off"):
            raise ValueError(f"--timing {timing!r}: use auto, on or off")
        tol = Tolerances(tol_acc, parse_fraction(tol_ttft), parse_fraction(tol_mem), tol_retention, timing, allow_missing)
        table = compare(load_baseline(baseline), entries_from_runs(paths), tol)
    except _reading_errors() as err:
        c.fail(err, 2)
    text = to_markdown(table, baseline, tol)
    typer.echo(text)
    if summary is not None:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    if table["failed"].any():
        raise typer.Exit(1)


def plot(
    runs: c.RunsArg,
    output: Annotated[Path, c.output_option("Directory for the figures.")],
    kinds: Annotated[str, typer.Option(help="Comma list: accuracy_retention, ttft_retention, pareto, memory.")] = "all",
    formats: Annotated[str, typer.Option(help="Comma list of file types.")] = "png,pdf",
) -> None:
    """Paper figures (PNG + vector PDF): accuracy and TTFT vs retention, accuracy-TTFT Pareto front, peak memory.

    \b
    Example:
      tokbench plot results/sweep --output figures/
    """
    from tokbench.plots import KINDS, plot as draw

    c.writable_dir(output)
    chosen = list(KINDS) if kinds == "all" else c.split(kinds)
    try:
        written, skipped = draw(runs, output, chosen, c.split(formats))
    except _reading_errors() as err:
        c.fail(err, 2)
    for note in skipped:
        c.note(f"skipped {note}")
    for path in written:
        typer.echo(str(path))


def html(
    runs: c.RunsArg,
    output: Annotated[Path, c.output_option("Directory for index.html, plots/ and thumbs/.")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """A static HTML report (opens from disk, no server): sortable tables, figures, per-sample gallery.

    The gallery filters by method, task and correctness and shows kept-token overlays for runs made
    with --save-masks.

    \b
    Example:
      tokbench html results/sweep --output report/
    """
    from tokbench.html_report import build

    c.writable_dir(output)
    try:
        index, notes = build(runs, output, bootstrap)
    except _reading_errors() as err:
        c.fail(err, 2)
    for note in notes[:10]:
        c.note(f"note: {note}")
    if len(notes) > 10:
        c.note(f"note: ... and {len(notes) - 10} more")
    typer.echo(str(index))


def register(app: typer.Typer) -> None:
    app.command()(report)
    app.command()(regress)
    app.command()(plot)
    app.command()(html)
