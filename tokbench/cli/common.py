"""What every `tokbench` command shares: the app, its consoles, one-line errors, interrupts and options.

Command modules import from here only (``tokbench/cli/__init__.py`` imports them and registers their
commands), so imports go one way: ``cli/__init__`` → ``cli/<group>`` → ``cli/common``. Nothing here
imports torch, transformers or lmms-eval: ``tokbench --help`` stays fast.

Adding a flag shared by several commands: declare it once below as an ``Annotated`` alias
(``BatchSizeOpt``) and use it in each command's signature.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from tokbench import interrupts

STATE: dict[str, Any] = {"debug": False}
# The UsageError of the click that typer runs on (typer >= 0.22 ships its own copy of click).
UsageError: type[Exception] = typer.BadParameter.__base__


# --- output ---------------------------------------------------------------------------------------
def _console(stderr: bool) -> Console:
    """A console that never wraps text and never reads markup: paths and commands stay on one line
    and ``[models]`` stays in a message. Off a terminal it is wide, so tables are never cut."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 10_000
    return Console(stderr=stderr, soft_wrap=True, markup=False, highlight=False, emoji=False, width=width)


def out() -> Console:
    """stdout: results (tables, paths written)."""
    return _console(stderr=False)


def err() -> Console:
    """stderr: messages, notes, progress."""
    return _console(stderr=True)


def note(message: str) -> None:
    """One plain line on stderr."""
    err().print(message)


def fail(error: BaseException | str, code: int = 2) -> NoReturn:
    """Print ``error: <first line>`` on stderr and exit with ``code`` (``--debug`` re-raises instead)."""
    if STATE["debug"] and isinstance(error, BaseException):
        raise error
    text = str(error)
    message = text.splitlines()[0] if text.strip() else type(error).__name__
    err().print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


class OptionError(ValueError):
    """A command-line value or combination that cannot run (bad usage, exit 2)."""


def usage_errors() -> tuple[type[BaseException], ...]:
    """The one-line errors a user causes (exit 2): the CLI's and the library's."""
    from tokbench.config import ConfigError
    from tokbench.judge import JudgeError
    from tokbench.models import ModelError
    from tokbench.pruner import BudgetError, MethodError
    from tokbench.runner import RunValidationError
    from tokbench.store import ConfigMismatchError
    from tokbench.tasks import TaskError

    return (
        OptionError, ConfigError, JudgeError, ModelError, BudgetError, MethodError, RunValidationError,
        ConfigMismatchError, TaskError,
    )  # fmt: skip


def writable_dir(path: Path, flag: str = "--output", what: str = "DIR") -> Path:
    """Create ``path`` if needed and check a file can be written there; exit 2 with one line if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".tokbench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        fail(f"{flag} {path} is not writable ({error.strerror or error}); pass {flag} {what}", 2)
    return path


def writable_file(path: Path, flag: str) -> Path:
    """Check that ``path`` (a file to create or append to) can be written; exit 2 with one line if not."""
    writable_dir(path.parent, flag, "FILE")
    if path.exists() and not path.is_file():
        fail(f"{flag} {path} is not a file; pass {flag} FILE", 2)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        fail(f"{flag} {path} is not writable ({error.strerror or error}); pass {flag} FILE", 2)
    return path


def unscored_message(run_dir: Path, n: int, why: str | None) -> str:
    """One line: how many predictions wait for the judge, why, and the command that scores them."""
    reason = f" ({why})" if why else ""
    return f"{n} prediction(s) saved but not judged{reason}; score them with: tokbench judge {run_dir} [--judge ...]"


# --- the app ---------------------------------------------------------------------------------------
def saving_to(path: str | Path) -> None:
    """Name where finished batches go, for the line an interrupt prints."""
    interrupts.STATE["saved"] = str(path)


class Group(TyperGroup):
    """The `tokbench` group: SIGINT and SIGTERM end any command with one line and exit 130 / 143
    (``tokbench.interrupts``); a command-line parsing error (unknown option, wrong type) is one line, exit 2."""

    def invoke(self, ctx: typer.Context) -> Any:
        with interrupts.handled():
            try:
                return super().invoke(ctx)
            except UsageError as error:  # unknown command or option, a value of the wrong type
                where = error.ctx.command_path if error.ctx else "tokbench"
                fail(f"{error.format_message()} (see {where} --help)", 2)


class App(typer.Typer):
    """The Typer app; called as a program (entry point, ``python -m tokbench``) it also turns an interrupt
    before any command starts (while typer parses) into the one line."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with interrupts.handled():
            return super().__call__(*args, **kwargs)


def make_app() -> typer.Typer:
    app = App(
        cls=Group,
        help="Benchmark visual-token compression methods for VLMs.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        add_completion=False,
        rich_markup_mode=None,  # help text is printed as written: [judge] stays, flags show no <bool>
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    )

    @app.callback()
    def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
        STATE["debug"] = debug

    return app


# --- parsing --------------------------------------------------------------------------------------
def split(text: str | None) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def numbers(text: str | None, kind: type, flag: str) -> list:
    """A comma list of ``kind`` values; bad usage (exit 2) names the flag."""
    try:
        return [kind(part) for part in split(text)]
    except ValueError:
        example = "0.25,0.5" if kind is float else "64,128"
        fail(f"{flag} {text!r}: use a comma list such as {example}", 2)


def method_args(items: list[str], methods: list[str] | None = None) -> dict[str, dict[str, str]]:
    """``--method-arg`` values → {method or "": {key: value}}; ``""`` applies to every method.

    ``k=1`` applies to all methods; ``fastv:k=1`` to fastv only (a sweep over several methods).

    >>> method_args(["k=1", "fastv:layer=2"], ["fastv"])
    {'': {'k': '1'}, 'fastv': {'layer': '2'}}
    """
    parsed: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        scope, colon, name = key.partition(":")
        scope, name = (scope.strip(), name.strip()) if colon else ("", key.strip())
        if not sep or not name or (colon and not scope):
            fail(f"--method-arg {item!r}: use key=value (or method:key=value)", 2)
        if scope and methods is not None and scope not in methods:
            fail(f"--method-arg {item!r}: {scope!r} is not one of the methods run ({', '.join(methods)})", 2)
        parsed.setdefault(scope, {})[name] = value.strip()
    return parsed


# --- shared options -------------------------------------------------------------------------------
MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Method name (see `tokbench list methods`).")]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task: tokbench task or any lmms-eval task name.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Model alias (tokbench.toml), hub id or local path.")]
RatioOpt = Annotated[Optional[float], typer.Option("--ratio", help="Keep this fraction of visual tokens, in (0, 1].")]
BudgetOpt = Annotated[Optional[int], typer.Option("--budget", help="Keep this many visual tokens (>= 1).")]
MethodArgOpt = Annotated[
    list[str],
    typer.Option("--method-arg", help="Method option key=value (repeatable); in a sweep method:key=value sets one method's."),
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Only the first N documents.")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch (tokbench.toml: 1).")]
WarmupOpt = Annotated[Optional[int], typer.Option("--warmup", help="Warm-up iterations on the first batch, not recorded (>= 0).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling methods.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto | bfloat16 | float16 | float32.")]
AttnOpt = Annotated[Optional[str], typer.Option("--attn", help="auto | sdpa | flash_attention_2 | eager.")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Override the task's generation length (>= 1).")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option("--max-pixels", help="Cap Qwen2.5-VL's image pixels (>= 1).")]
DeviceMapOpt = Annotated[
    Optional[str],
    typer.Option("--device-map", help="auto: spread a model larger than one GPU over all visible GPUs (accelerate); "
                 "or a JSON file {module: device}. Default: one device."),
]
PositionPolicyOpt = Annotated[Optional[str], typer.Option("--position-policy", help="keep | reindex (default: the family's).")]
RandomWeightsOpt = Annotated[bool, typer.Option("--random-weights", help="Real architecture, random weights (efficiency only).")]
SaveMasksOpt = Annotated[bool, typer.Option("--save-masks", help="Store kept token indices per stage in each row.")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Local copy of the task's dataset.")]
RunOutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output dir (default: tokbench.toml's, results/).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Extra tokbench.toml to read (must exist).")]
RunsArg = Annotated[list[Path], typer.Argument(help="Run directories, or directories holding runs (searched recursively).")]
JudgeOpt = Annotated[
    Optional[str], typer.Option("--judge", help="Judge for free-form tasks: endpoint URL (/v1), exact or local-hf:PATH.")
]
JudgeModelOpt = Annotated[Optional[str], typer.Option("--judge-model", help="Model name the judge endpoint serves.")]
JudgeKeyOpt = Annotated[
    Optional[str], typer.Option("--judge-key-env", help="Env var holding the judge's API key (default OPENAI_API_KEY).")
]
JudgeConcurrencyOpt = Annotated[Optional[int], typer.Option("--judge-concurrency", help="Judge calls in flight (8).")]
JudgeTimeoutOpt = Annotated[Optional[float], typer.Option("--judge-timeout", help="Seconds one judge request may take (60).")]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait", help="If another process holds the run directory, wait for it to finish instead of refusing."),
]


def output_option(help: str) -> Any:
    """``--output/-o`` (``--out`` still accepted) for a command that writes ``help``'s target."""
    return typer.Option("--output", "-o", "--out", help=help)
