"""A grid of runs over one model and task: methods x (ratios | budgets), plus `full` once.

Each cell is an ordinary ``tokbench.runner.run``; nothing here measures anything. Every cell is
validated before the first model loads, so a typo in the fifth method costs a second. A cell already
complete in the output directory is skipped without loading the model: complete means a run directory
whose manifest holds the cell's settings, the task's version and a summary with ``n`` equal to the
number of documents the task (with ``--limit``) has. An incomplete cell resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokbench.pruner import budget_label
from tokbench.report import REFERENCE
from tokbench.runner import RunConfig, RunValidationError, run, validate
from tokbench.store import MANIFEST, Manifest, ManifestError


@dataclass
class CellResult:
    config: RunConfig
    status: str  # "skipped" (already complete) | "ran" | "failed"
    run_dir: Path | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.config.method} {budget_label(self.config.make_budget())}"


def plan(
    base: RunConfig,
    methods: Sequence[str],
    ratios: Sequence[float] = (),
    budgets: Sequence[int] = (),
    method_args: Mapping[str, Mapping[str, str]] | None = None,
) -> list[RunConfig]:
    """``full`` first (once, whatever ``methods`` says), then each method at each ratio or budget.

    ``method_args``: {method: {key: value}}; the key ``""`` applies to every method but ``full``
    (a method's own entry wins), e.g. ``{"": {"k": "1"}}`` for FastV and PyramidDrop alike.

    >>> [(c.method, c.ratio) for c in plan(RunConfig("m", "x", "t"), ["random", "full"], [0.25, 0.5])]
    [('full', None), ('random', 0.25), ('random', 0.5)]
    >>> [c.method_args for c in plan(RunConfig("m", "x", "t"), ["fastv"], [0.5], method_args={"": {"k": "1"}})]
    [{}, {'k': '1'}]
    """
    method_args = method_args or {}
    if ratios and budgets:
        raise RunValidationError("pass either --ratios or --budgets, not both")
    if not ratios and not budgets and any(m != REFERENCE for m in methods):
        raise RunValidationError("pass --ratios (e.g. 0.111,0.25,0.5) or --budgets (e.g. 64,128,192)")
    cells = [replace(base, method=REFERENCE, ratio=None, budget=None, method_args={})]
    for method in dict.fromkeys(methods):
        if method == REFERENCE:
            continue
        args = {**base.method_args, **method_args.get("", {}), **method_args.get(method, {})}
        cells += [replace(base, method=method, ratio=float(r), budget=None, method_args=args) for r in ratios]
        cells += [replace(base, method=method, ratio=None, budget=int(b), method_args=args) for b in budgets]
    return cells


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def find_complete(config: RunConfig, task_version: Any, expected_n: int) -> Path | None:
    """The run directory in ``config.output`` that already holds this cell complete, else None."""
    want = _canonical({**config.identity(), "task_version": task_version})
    for manifest_path in sorted(Path(config.output).glob(f"*/{MANIFEST}")):
        try:
            manifest = Manifest.from_file(manifest_path)
        except (OSError, ManifestError):
            continue
        if all(manifest.config.get(k) == v for k, v in want.items()) and (manifest.summary or {}).get("n") == expected_n:
            return manifest_path.parent
    return None


def prepare(cells: Sequence[RunConfig], aliases: dict[str, str] | None = None) -> list[tuple[RunConfig, Path | None, str | None]]:
    """Validate every cell before any model loads: (config, its complete run dir or None, why it cannot run
    or None). A budget this model cannot reach is that cell's failure (the grid goes on); any other usage
    error (unknown task or method argument, bad output dir) is raised."""
    from tokbench.pruner import BudgetError

    prepared = []
    for config in cells:
        config.make_budget()  # a malformed budget is a usage error, not a cell's failure
        try:
            _, task = validate(config, aliases)
        except BudgetError as err:
            prepared.append((config, None, f"{type(err).__name__}: {err}"))
            continue
        prepared.append((config, find_complete(config, task.version, len(task.doc_ids())), None))
    return prepared


def run_sweep(
    cells: Sequence[RunConfig],
    aliases: dict[str, str],
    on_cell: Callable[[int, RunConfig], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    usage_errors: tuple[type[BaseException], ...] = (),
) -> list[CellResult]:
    """Run the cells in order, skipping complete ones. ``on_cell(index, config)`` is called before each
    cell that runs, ``on_batch(done, total)`` as ``runner.run`` reports. A cell that raises is recorded
    as failed and the sweep goes on, except for ``usage_errors`` and KeyboardInterrupt, which stop it."""
    results = []
    for index, (config, done_dir, unreachable) in enumerate(prepare(cells, aliases)):
        if unreachable is not None:
            results.append(CellResult(config, "failed", error=unreachable))
            continue
        if done_dir is not None:
            summary = Manifest.from_file(done_dir / MANIFEST).summary
            results.append(CellResult(config, "skipped", done_dir, summary))
            continue
        if on_cell:
            on_cell(index, config)
        try:
            result = run(config, aliases, on_batch=on_batch)
        except usage_errors:
            raise
        except Exception as err:  # noqa: BLE001 - one broken cell does not stop the grid
            results.append(CellResult(config, "failed", error=f"{type(err).__name__}: {err}"))
            continue
        results.append(CellResult(config, "ran", result.run_dir, result.summary))
    return results
