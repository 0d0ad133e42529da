"""The `tokbench` command.

Exit codes: 0 success; 1 the job failed; 2 bad usage (unknown name, bad budget, unreadable config,
missing model path, unwritable output, ...; one line, no traceback unless --debug); 3 the run finished
but some samples failed (their rows carry ``error``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Benchmark visual-token compression methods for VLMs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

_STATE = {"debug": False}

MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Method name (see `tokbench list methods`).")]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task: tokbench task or any lmms-eval task name.")]
ModelOpt = Annotated[
    str, typer.Option("--model", help="Model alias (tokbench.toml), hub id or local path.")
]
RatioOpt = Annotated[Optional[float], typer.Option("--ratio", help="Keep this fraction of visual tokens, in (0, 1].")]
BudgetOpt = Annotated[Optional[int], typer.Option("--budget", help="Keep this many visual tokens (>= 1).")]
JudgeOpt = Annotated[
    Optional[str], typer.Option("--judge", help="Judge for free-form tasks: endpoint URL (/v1), exact or local-hf:PATH.")
]
JudgeModelOpt = Annotated[Optional[str], typer.Option("--judge-model", help="Model name the judge endpoint serves.")]
JudgeKeyOpt = Annotated[
    Optional[str], typer.Option("--judge-key-env", help="Env var holding the judge's API key (default OPENAI_API_KEY).")
]
JudgeConcurrencyOpt = Annotated[Optional[int], typer.Option("--judge-concurrency", help="Judge calls in flight (8).")]


def _usage_errors() -> tuple[type[BaseException], ...]:
    from tokbench.config import ConfigError
    from tokbench.judge import JudgeError
    from tokbench.models import ModelError
    from tokbench.pruner import BudgetError, MethodError
    from tokbench.runner import RunValidationError
    from tokbench.store import ConfigMismatchError
    from tokbench.tasks import TaskError

    return (
        ConfigError, JudgeError, ModelError, BudgetError, MethodError, RunValidationError, ConfigMismatchError, TaskError
    )  # fmt: skip


def _fail(err: BaseException, code: int) -> None:
    if _STATE["debug"]:
        raise err
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _STATE["debug"] = debug


def _parse_method_args(items: list[str]) -> dict[str, str]:
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--method-arg {item!r}: use key=value")
        args[key.strip()] = value.strip()
    return args


@app.command()
def run(
    method: MethodOpt,
    task: TaskOpt,
    model: ModelOpt = "tiny-qwen2.5-vl",
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    method_arg: Annotated[list[str], typer.Option("--method-arg", help="Method option key=value (repeatable).")] = [],  # noqa: B006
    limit: Annotated[Optional[int], typer.Option(help="Only the first N documents.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch.")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up iterations on the first batch, not recorded.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling methods.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto | bfloat16 | float16 | float32.")] = None,
    attn: Annotated[Optional[str], typer.Option("--attn", help="auto | sdpa | flash_attention_2 | eager.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Override the task's generation length.")] = None,
    position_policy: Annotated[Optional[str], typer.Option(help="keep | reindex (default: the family's).")] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="Local copy of the task's dataset.")] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Real architecture, random weights (efficiency only).")
    ] = False,
    max_pixels: Annotated[Optional[int], typer.Option(help="Cap Qwen2.5-VL's image pixels.")] = None,
    save_masks: Annotated[bool, typer.Option("--save-masks", help="Store kept token indices per stage.")] = False,
    efficiency: Annotated[
        bool,
        typer.Option(
            "--efficiency",
            help="GlimpsePrune's V* efficiency protocol as defaults: batch 4, 3 warm-ups, ratio 0.111, "
            "max pixels 3211264 (explicit options win).",
        ),
    ] = False,
    judge: JudgeOpt = None,
    judge_model: JudgeModelOpt = None,
    judge_key_env: JudgeKeyOpt = None,
    judge_concurrency: JudgeConcurrencyOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output dir (default: results/).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Extra tokbench.toml to read.")] = None,
) -> None:
    """Run one method on one task and write DIR/<run_id>/samples.jsonl + manifest.json.

    Example: tokbench run --method random --ratio 0.25 --task vstar-synth --model tiny-qwen2.5-vl
    """
    try:
        from tokbench.config import load_config
        from tokbench.judge import JudgeConfig
        from tokbench.runner import RunConfig, RunValidationError, validate

        cfg = load_config(config)
        d = dict(cfg.defaults)
        if efficiency:
            d.update(batch_size=4, warmup=3)
            if ratio is None and budget is None:
                ratio = 0.111
            max_pixels = max_pixels or 3211264
        run_config = RunConfig(
            model=model,
            method=method,
            task=task,
            ratio=ratio,
            budget=budget,
            method_args=_parse_method_args(method_arg),
            limit=limit,
            batch_size=batch_size if batch_size is not None else int(d.get("batch_size", 1)),
            warmup=warmup if warmup is not None else int(d.get("warmup", 0)),
            seed=seed if seed is not None else int(d.get("seed", 0)),
            dtype=dtype or d.get("dtype", "auto"),
            attn_implementation=attn or d.get("attn_implementation", "auto"),
            max_new_tokens=max_new_tokens,
            position_policy=position_policy,
            data_dir=data_dir,
            random_weights=random_weights,
            max_pixels=max_pixels,
            save_masks=save_masks,
            judge=JudgeConfig.from_table(
                cfg.judge, judge=judge, model=judge_model, key_env=judge_key_env, concurrency=judge_concurrency
            ),
            output=str(output or d.get("output", "results")),
        )
        from tokbench.models import resolve_model

        target = resolve_model(model, cfg.models)
        if random_weights:
            from tokbench.models.random_weights import config_name

            try:
                config_name(model, target)
            except ValueError as err:
                raise RunValidationError(str(err)) from None
        validate(run_config)
    except typer.BadParameter:
        raise
    except _usage_errors() as err:
        _fail(err, 2)
    result = _execute(run_config, cfg.models)
    if result.summary is None:  # a non-main process of a data-parallel run: the main one reports
        return
    _print_summary(result)
    if result.summary.get("n_unscored"):
        from tokbench.cli_judge import unscored_message

        console.print(unscored_message(result.run_dir, result.summary["n_unscored"], result.judge_error or (result.judge and result.judge.error)))
        if result.judge_error or result.judge:
            raise typer.Exit(1)
    if result.summary.get("n_errors"):
        console.print(f"{result.summary['n_errors']} sample(s) failed; see the 'error' field in {result.run_dir}")
        raise typer.Exit(3)


def _execute(run_config, aliases):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokbench.runner import run as run_job

    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        ) as progress:
            bar = progress.add_task(f"{run_config.method} on {run_config.task}", total=None)
            return run_job(run_config, aliases, on_batch=lambda done, total: progress.update(bar, completed=done, total=total))
    except _usage_errors() as err:
        _fail(err, 2)
    except KeyboardInterrupt:
        console.print(f"interrupted; finished batches are saved under {run_config.output}. Rerun the same command to resume.")
        raise typer.Exit(130)
    except Exception as err:  # noqa: BLE001
        _fail(err, 1)


def _print_summary(result) -> None:
    from tokbench.summary import summary_table

    out.print(summary_table(result.summary, title=result.run_dir.name))
    out.print(f"results: {result.run_dir}")


@app.command()
def show(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run dirs made with --save-masks (with --doc-id).")] = None,
    doc_id: Annotated[Optional[int], typer.Option("--doc-id", help="Document to draw from the saved runs.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image file (live mode).")] = None,
    question: Annotated[Optional[str], typer.Option(help="The question asked about it (live mode).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods, e.g. full,random,fastv (live mode).")] = None,
    out: Annotated[Path, typer.Option(help="Output figure (PNG and PDF are written).")] = Path("show.png"),
    model: ModelOpt = "tiny-qwen2.5-vl",
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
) -> None:
    """Draw which visual tokens each method keeps (pruned cells dimmed): live on one image, or from saved runs.

    Examples:
      tokbench show --image cat.png --question "What colour?" --methods full,random,fastv --ratio 0.25 --out fig.png
      tokbench show results/full-run results/random-run --doc-id 3 --out doc3.png
    """
    from tokbench.show import draw

    if runs:
        if doc_id is None:
            _fail(ValueError("pass --doc-id ID to draw a document of the saved runs"), 2)
        from tokbench.show import run_panels

        try:
            panels = run_panels(runs, doc_id)
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # no such run/doc, no masks, unreadable data
            _fail(err, 2)
        console.print("wrote " + ", ".join(str(p) for p in draw(panels, out)))
        return
    try:
        from PIL import Image

        from tokbench.config import load_config
        from tokbench.models import load_model
        from tokbench.pruner import Budget, get_method_class
        from tokbench.runner import RunConfig

        if image is None or question is None or not methods:
            raise ValueError("pass --image, --question and --methods (or run dirs and --doc-id)")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        for name in names:
            get_method_class(name)
        chosen = RunConfig(model=model, method="full", task="", ratio=ratio, budget=budget).make_budget()
        if not image.exists():
            raise FileNotFoundError(f"image {image} does not exist")
        picture = Image.open(image).convert("RGB")
        adapter = load_model(model, load_config().models)
    except (*_usage_errors(), FileNotFoundError, OSError) as err:
        _fail(err, 2)
    from tokbench.show import run_methods

    try:
        panels = run_methods(adapter, picture, question, names, Budget.ratio(0.25) if chosen == Budget.full() else chosen)
    except ValueError as err:
        _fail(err, 2)
    console.print("wrote " + ", ".join(str(p) for p in draw(panels, out)))


@app.command("list")
def list_(what: Annotated[str, typer.Argument(help="methods | tasks | models")]) -> None:
    """List registered methods, tasks or model aliases."""
    if what == "methods":
        from tokbench.pruner import method_names

        for name in method_names():
            out.print(name)
    elif what == "tasks":
        from tokbench.tasks import task_names

        for name in task_names():
            out.print(name)
    elif what == "models":
        from tokbench.config import load_config

        for alias, target in sorted(load_config().models.items()):
            out.print(f"{alias}\t{target}")
    else:
        _fail(ValueError(f"cannot list {what!r}; use methods, tasks or models"), 2)


from tokbench.cli_analysis import register; register(app)  # noqa: E402, E702 - sweep, report, regress, plot
from tokbench.cli_judge import register as _judge; _judge(app)  # noqa: E402, E702 - judge
from tokbench.cli_train import register as _train; _train(app)  # noqa: E402, E702 - train-canary
