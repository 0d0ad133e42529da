"""`tokbench judge RUN_DIR...`: score (or finish scoring) a judged run's saved predictions.

Exit codes: 0 every prediction scored; 1 predictions left unscored (endpoint down: rerun to finish);
2 bad usage (no runs under a path, an unreadable manifest or samples file, a bad judge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tokbench.cli import common as c


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path that is a run directory (has manifest.json), else the run directories under it."""
    found: list[Path] = []
    for path in paths:
        if (path / "manifest.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("manifest.json")) if path.is_dir() else []
        if not below:
            c.fail(f"{path} is not a tokbench run directory and holds none (no manifest.json); "
                   "pass results/<run_id> or a folder of runs", 2)  # fmt: skip
        found += below
    return list(dict.fromkeys(found))


def _saved_judge(run_dir: Path) -> dict[str, Any]:
    """The judge settings the run was started with (its manifest's settings.judge)."""
    from tokbench.store import MANIFEST, Manifest, ManifestError

    path = run_dir / MANIFEST
    try:
        manifest = Manifest.from_file(path)
    except OSError as err:
        c.fail(f"{path}: not a readable tokbench manifest ({err.strerror}); restore it or rerun the run", 2)
    except ManifestError as err:
        c.fail(err, 2)
    if not isinstance(manifest.settings, dict):
        c.fail(f"{path}: not a tokbench manifest (settings is not a JSON object); restore it or rerun the run", 2)
    return manifest.settings.get("judge") or {}


def judge(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories of a judged task, or folders holding them.")],
    judge: c.JudgeOpt = None,
    judge_model: c.JudgeModelOpt = None,
    judge_key_env: c.JudgeKeyOpt = None,
    judge_concurrency: c.JudgeConcurrencyOpt = None,
    judge_timeout: c.JudgeTimeoutOpt = None,
    wait: c.WaitOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Re-score rows that already have a score.")] = False,
    config: c.ConfigOpt = None,
) -> None:
    """Score saved predictions with the LLM judge; rows already scored are kept (cached calls are free).

    The judge defaults to the one the run was started with, then tokbench.toml's [judge] table.
    A folder of runs judges every run under it. Exit 1 when predictions are left unscored (endpoint
    down); rerun the command to finish.

    \b
    Example:
      tokbench judge results/<run_id> --judge http://localhost:8000/v1 --judge-model NAME
    """
    from tokbench.config import ConfigError, load_config
    from tokbench.judge import JudgeConfig, JudgeError, JudgeInterrupted, build_judge, judge_run
    from tokbench.runlock import RunLockedError
    from tokbench.store import DiskFullError, ManifestError

    runs = find_runs(run_dirs)
    pending, run_dir = 0, runs[0]
    try:
        table = load_config(config).judge
        for run_dir in runs:
            saved = _saved_judge(run_dir)
            base = {**table, **{k: v for k, v in saved.items() if v is not None}}
            judge_config = JudgeConfig.from_table(
                base, judge=judge, model=judge_model, key_env=judge_key_env, concurrency=judge_concurrency,
                timeout=judge_timeout,
            )
            report = judge_run(run_dir, build_judge(judge_config), judge_config.concurrency, force=force, wait=wait)
            c.out().print(f"{run_dir}: judged {report.judged}, judge calls {report.calls}, unscored {report.pending}")
            if report.pending:
                c.note(c.unscored_message(run_dir, report.pending, report.error))
            pending += report.pending
    except (ConfigError, JudgeError, ManifestError) as err:
        c.fail(err, 2)
    except (DiskFullError, RunLockedError) as err:
        c.fail(err, 1)
    except JudgeInterrupted as err:
        c.note(str(err))
        raise typer.Exit(130) from None
    except (ValueError, OSError, TypeError, KeyError) as err:  # a corrupt samples file or manifest
        c.fail(err if str(run_dir) in str(err) else f"{run_dir}: {err}", 2)
    if pending:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(judge)
