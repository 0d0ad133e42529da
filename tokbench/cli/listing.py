"""`tokbench list | show`: what is registered, and which visual tokens each method keeps.

`list` imports neither torch nor transformers nor lmms-eval. Exit codes: 0 success; 2 bad usage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokbench.cli import common as c

FigureOpt = Annotated[Path, c.output_option("Output figure (PNG and PDF are written).")]


def list_(what: Annotated[str, typer.Argument(help="methods | tasks | models")]) -> None:
    """List registered methods, tasks or model aliases."""
    if what == "methods":
        from tokbench.pruner import method_names

        lines = list(method_names())
    elif what == "tasks":
        from tokbench.tasks import task_names

        lines = list(task_names())
    elif what == "models":
        from tokbench.config import load_config

        try:
            aliases = sorted(load_config().models.items())
        except c.usage_errors() as err:
            c.fail(err, 2)
        width = max((len(alias) for alias, _ in aliases), default=0)
        lines = [f"{alias.ljust(width)}  {target}" for alias, target in aliases]
    else:
        c.fail(f"cannot list {what!r}; use methods, tasks or models", 2)
    for line in lines:
        typer.echo(line)


def _check_rows(run_dir: Path) -> None:
    """Exit 2 naming the file when a run's samples.jsonl holds a line that is not a sample row."""
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        c.fail(f"{run_dir} is not a tokbench run directory (no samples.jsonl); pass a run made with --save-masks", 2)
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else {"doc_id": None}
        except ValueError:
            continue  # the store reports corrupt JSON with its own message
        if not isinstance(row, dict) or "doc_id" not in row:
            c.fail(f"{path}: line {number} is not a sample row (a JSON object with doc_id); the file is corrupt", 2)


def show(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run dirs made with --save-masks (with --doc-id).")] = None,
    doc_id: Annotated[Optional[int], typer.Option("--doc-id", help="Document to draw from the saved runs.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image file (live mode).")] = None,
    question: Annotated[Optional[str], typer.Option(help="The question asked about it (live mode).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods, e.g. full,random,fastv (live mode).")] = None,
    output: FigureOpt = Path("show.png"),
    model: c.ModelOpt = "tiny-qwen2.5-vl",
    ratio: c.RatioOpt = None,
    budget: c.BudgetOpt = None,
) -> None:
    """Draw which visual tokens each method keeps (pruned cells dimmed): live on one image, or from saved runs.

    \b
    Examples:
      tokbench show --image cat.png --question "What colour?" --methods full,random,fastv --ratio 0.25 --output fig.png
      tokbench show results/full-run results/random-run --doc-id 3 --output doc3.png
    """
    c.writable_dir(output.parent)
    if runs:
        if doc_id is None:
            c.fail("pass --doc-id ID to draw a document of the saved runs", 2)
        from tokbench.show import draw, run_panels

        for run_dir in runs:
            _check_rows(run_dir)
        try:
            panels = run_panels(runs, doc_id)
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # no such run/doc, no masks, unreadable data
            c.fail(err, 2)
        c.note("wrote " + ", ".join(str(p) for p in draw(panels, output)))
        return
    try:
        from PIL import Image

        from tokbench.config import load_config
        from tokbench.models import load_model
        from tokbench.pruner import Budget, get_method_class
        from tokbench.runner import RunConfig

        if image is None or question is None or not methods:
            raise ValueError("pass --image, --question and --methods (or run dirs and --doc-id)")
        names = c.split(methods)
        for name in names:
            get_method_class(name)
        chosen = RunConfig(model=model, method="full", task="", ratio=ratio, budget=budget).make_budget()
        if not image.exists():
            raise FileNotFoundError(f"image {image} does not exist")
        picture = Image.open(image).convert("RGB")
        adapter = load_model(model, load_config().models)
    except (*c.usage_errors(), FileNotFoundError, OSError, ValueError) as err:
        c.fail(err, 2)
    from tokbench.show import draw, run_methods

    try:
        panels = run_methods(adapter, picture, question, names, Budget.ratio(0.25) if chosen is None else chosen)
    except ValueError as err:
        c.fail(err, 2)
    c.note("wrote " + ", ".join(str(p) for p in draw(panels, output)))


def register(app: typer.Typer) -> None:
    app.command("list")(list_)
    app.command()(show)
