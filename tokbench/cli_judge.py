"""`tokbench judge RUN_DIR...`: score (or finish scoring) a judged run's saved predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokbench.cli import JudgeConcurrencyOpt, JudgeKeyOpt, JudgeModelOpt, JudgeOpt, _fail, console, out


def unscored_message(run_dir: Path, n: int, why: str | None) -> str:
    """One line: how many predictions wait for the judge, why, and the command that scores them."""
    reason = f" ({why})" if why else ""
    return f"{n} prediction(s) saved but not judged{reason}; score them with: tokbench judge {run_dir} [--judge ...]"


def judge(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories of a judged task (e.g. visual_cot).")],
    judge: JudgeOpt = None,
    judge_model: JudgeModelOpt = None,
    judge_key_env: JudgeKeyOpt = None,
    judge_concurrency: JudgeConcurrencyOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Re-score rows that already have a score.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="Extra tokbench.toml to read.")] = None,
) -> None:
    """Score saved predictions with the LLM judge; rows already scored are kept (cached calls are free).

    The judge defaults to the one the run was started with, then tokbench.toml's [judge] table.
    Exit 1 when predictions are left unscored (endpoint down); rerun the command to finish.
    """
    import json

    from tokbench.config import ConfigError, load_config
    from tokbench.judge import JudgeConfig, JudgeError, build_judge, judge_run

    try:
        table = load_config(config).judge
        pending = 0
        for run_dir in run_dirs:
            manifest_path = run_dir / "manifest.json"
            if not manifest_path.is_file():
                raise JudgeError(f"{run_dir} is not a tokbench run directory (no manifest.json)")
            saved = (json.loads(manifest_path.read_text()).get("settings") or {}).get("judge") or {}
            base = {**table, **{k: v for k, v in saved.items() if v is not None}}
            judge_config = JudgeConfig.from_table(
                base, judge=judge, model=judge_model, key_env=judge_key_env, concurrency=judge_concurrency
            )
            report = judge_run(run_dir, build_judge(judge_config), judge_config.concurrency, force=force)
            out.print(f"{run_dir}: judged {report.judged}, judge calls {report.calls}, unscored {report.pending}")
            if report.pending:
                console.print(unscored_message(run_dir, report.pending, report.error))
            pending += report.pending
    except (ConfigError, JudgeError) as err:
        _fail(err, 2)
    if pending:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(judge)
