"""Tables over finished runs: one row per (method, budget, task) and setting, compared with `full`.

Reports read files, never internals: ``aggregate`` takes the tidy per-sample frame of
``tokbench.store.load_runs``, splits it into rows and computes each row's figures with
``tokbench.aggregates.aggregate`` (the run summary's function) and, against its ``full`` row,
``tokbench.aggregates.paired``. Runs that differ in a result-defining setting (batch size, limit,
max_pixels, dtype, task version, ... see ``tokbench.run_settings``) are never pooled: they get
separate rows whose ``settings`` label says how they differ. Grouping without ``budget`` or
``task`` when that would pool several is refused (``ReportError``).

Columns of ``aggregate``'s frame (fractions are 0-1; "points" are 100 x a score difference):

==================================  ================================================================
``settings``, ``method_settings``    the splitting settings of the row (``key=value, ...``); one
                                     column per splitting key as well
``runs``, ``pooled``                 run directories in the row; the seeds they pool, if several
``n``, ``n_errors``, ``n_unscored``  samples, samples with an ``error``, judged samples not judged yet
``accuracy``                         mean score; with subsets the unweighted mean over subsets
``acc_ci_low/high``                  bootstrap 95% CI of ``accuracy``
``accuracy_micro``                   with subsets: the pooled mean; ``accuracy[<subset>]`` each subset's
``acc_rel_full_pct``                 accuracy / accuracy of the reference ``full`` row, in %
``acc_diff``, ``acc_diff_ci_*``      mean paired score difference to ``full`` and its paired bootstrap CI
``n_paired``                         documents in that pairing
``agreement``, ``agreement_ci_*``    fraction of documents where the prediction equals ``full``'s
``n_agree``                          documents in that pairing
``speedup``                          mean TTFT of ``full`` / mean TTFT of this row (same timing settings
                                     and TTFT basis only)
``speedup_bound``                    1 / ``flops_ratio_total``: the speedup the FLOPs allow
``ttft_basis``                       which TTFT the time columns hold (per sample, batch/b | batch)
every ``aggregates.FIGURES`` key     retention, FLOPs, time spans, memory (see that module)
==================================  ================================================================

The reference ``full`` row of a row: same model and task, same settings except method-specific and
timing ones; among several, the one with the same timing settings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokbench import run_settings
from tokbench.aggregates import FIGURES, N_BOOT, paired
from tokbench.aggregates import aggregate as aggregate_rows

DEFAULT_BY: tuple[str, ...] = ("method", "budget", "task")
REFERENCE = "full"
_GROUPABLE = ("model", "method", "budget", "task", "run_id", "run_dir")
_NEVER_POOLED = ("budget", "task")


class ReportError(ValueError):
    """Nothing to report on, or a grouping that cannot be used."""


# --- grouping -------------------------------------------------------------------------------------
def budget_sort_key(label: object) -> tuple[int, float]:
    """Order budget labels: ratios ascending (``r0.111`` < ``r0.25`` < ``r1``), then counts, then the rest."""
    match = re.fullmatch(r"(r|n|dyn)([0-9.]+)", str(label))
    if not match:
        return (3, 0.0)
    return ({"r": 0, "n": 1, "dyn": 2}[match.group(1)], float(match.group(2)))


def resolve_by(samples: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> list[str]:
    """Check the grouping columns; add ``model`` in front when runs of several models are mixed, so
    accuracies of different models are never averaged together; refuse a grouping that would pool
    several budgets or tasks into one row."""
    by = [b.strip() for b in by if b.strip()]
    unknown = [b for b in by if b not in _GROUPABLE]
    if unknown:
        raise ReportError(f"cannot group by {', '.join(unknown)}; use some of {', '.join(_GROUPABLE)}")
    if "method" not in by:
        raise ReportError("--by must include method")
    if "model" not in by and samples["model"].nunique(dropna=True) > 1:
        by = ["model", *by]
    by = list(dict.fromkeys(by))
    for column in _NEVER_POOLED:
        if column in by:
            continue
        counts = samples.groupby(by, sort=True)[column].nunique()
        if (counts > 1).any():
            key = counts[counts > 1].index[0]
            values = sorted(samples.set_index(by).loc[[key], column].astype(str).unique())
            cell = " ".join(map(str, key if isinstance(key, tuple) else (key,)))
            raise ReportError(f"--by {','.join(by)} would pool {column}s {', '.join(values)} of {cell} into one row; "
                              f"add {column} to --by")  # fmt: skip
    return by


def _row_keys(samples: pd.DataFrame, by: list[str]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """run_dir → its row key (``by``), and → its (model, task) scope."""
    first = samples.drop_duplicates("run_dir").set_index("run_dir")
    scope = [c for c in ("model", "task") if c in first.columns]
    cells = {r: tuple(first.loc[r, by]) for r in first.index}
    return cells, {r: tuple(first.loc[r, scope]) for r in first.index}


# --- aggregation ----------------------------------------------------------------------------------
def aggregate(samples: pd.DataFrame, by: Sequence[str] = DEFAULT_BY, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per group of ``by`` and splitting setting (see the module docstring), ``full`` first."""
    if samples.empty:
        raise ReportError("no samples to report on")
    by = resolve_by(samples, by)
    cells, scopes = _row_keys(samples, by)
    settings = {run: run_settings.read(run) for run in cells}
    split = run_settings.split_keys(settings, cells, scopes)
    groups: dict[tuple, list[str]] = {}
    for run in cells:
        key = cells[run] + tuple(run_settings.label_value(settings[run].get(k)) for k in split)
        groups.setdefault(key, []).append(run)
    records = {run: rows.to_dict("records") for run, rows in samples.groupby("run_dir", sort=False)}
    rows, members = [], []
    for key, runs in groups.items():
        group = [r for run in runs for r in records[run]]
        values = dict(zip([*by, *split], key, strict=True))
        seeds = sorted({run_settings.label_value(settings[run].get("seed")) for run in runs})
        figures = aggregate_rows(group, n_boot, seed)
        by_subset = figures.pop("accuracy_by_subset", None) or {}
        rows.append({
            **values,
            "settings": run_settings.label((k, values[k]) for k in split if not run_settings.is_method_specific(k)),
            "method_settings": run_settings.label((k, values[k]) for k in split if run_settings.is_method_specific(k)),
            "runs": len(runs), "pooled": f"seed={','.join(seeds)}" if len(seeds) > 1 else "",
            **figures, **{f"accuracy[{s}]": v for s, v in by_subset.items()},
        })  # fmt: skip
        members.append(group)
    table = pd.DataFrame(rows)
    for optional in ("n_unscored", "accuracy_micro"):  # present only for judged tasks / subsets
        if optional not in table:
            table[optional] = np.nan
    _compare_with_reference(table, members, by, split, n_boot, seed)
    return _sorted(table, [*by, *split])[_column_order(table, by, split)]


def _reference_of(table: pd.DataFrame, index: int, by: list[str], split: list[str]) -> int | None:
    """Index of the ``full`` row ``index`` is compared with (module docstring), or None."""
    row = table.loc[index]
    same = [c for c in by if c not in ("method", "budget", "run_id", "run_dir")]
    same += [k for k in split if not run_settings.is_method_specific(k) and k not in run_settings.TIMING]
    full = table[(table["method"] == REFERENCE) & (table[same] == row[same]).all(axis=1)] if same else table[table["method"] == REFERENCE]
    timing = [k for k in split if k in run_settings.TIMING]
    if len(full) > 1 and timing:
        full = full[(full[timing] == row[timing]).all(axis=1)]
    if len(full) > 1:
        where = ", ".join(f"{c}={row[c]}" for c in same) or "the report"
        raise ReportError(f"more than one {REFERENCE!r} row for {where}; narrow the runs or --by")
    return int(full.index[0]) if len(full) else None


def _compare_with_reference(table: pd.DataFrame, members: list[list[dict[str, Any]]], by: list[str], split: list[str],
                            n_boot: int, seed: int) -> None:  # fmt: skip
    """Add the columns against ``full`` in place: relative accuracy, paired difference, agreement, speedup."""
    timing = [k for k in split if k in run_settings.TIMING]
    extra = []
    for index in table.index:
        ref = _reference_of(table, index, by, split)
        values: dict[str, Any] = {"speedup_bound": _ratio(1.0, table.loc[index, "flops_ratio_total"])}
        if ref is not None:
            row, full = table.loc[index], table.loc[ref]
            same_timing = all(row[k] == full[k] for k in timing) and row["ttft_basis"] == full["ttft_basis"]
            values.update(paired(members[index], members[ref], n_boot, seed))
            values["acc_rel_full_pct"] = 100.0 if index == ref else _ratio(row["accuracy"], full["accuracy"]) * 100
            values["speedup"] = _ratio(full["ttft_ms"], row["ttft_ms"]) if same_timing else float("nan")
        extra.append(values)
    for column, values in pd.DataFrame(extra, index=table.index).items():
        table[column] = values
    for column in _PAIRED:
        if column not in table:
            table[column] = np.nan
    table["n_paired"] = table["n_paired"].astype("Int64")
    table["n_agree"] = table["n_agree"].astype("Int64")


_PAIRED = ("acc_rel_full_pct", "acc_diff", "acc_diff_ci_low", "acc_diff_ci_high", "n_paired",
           "agreement", "agreement_ci_low", "agreement_ci_high", "n_agree", "speedup")  # fmt: skip


def _ratio(numerator: Any, denominator: Any) -> float:
    if numerator is None or denominator is None or pd.isna(numerator) or pd.isna(denominator) or denominator == 0:
        return float("nan")
    return float(numerator) / float(denominator)


def _sorted(table: pd.DataFrame, keys_: list[str]) -> pd.DataFrame:
    keys = pd.DataFrame(index=table.index)
    for column in keys_:
        if column == "method":
            keys["_method"] = table["method"].ne(REFERENCE).astype(int).astype(str) + table["method"].astype(str)
        elif column == "budget":
            keys["_budget"] = table["budget"].map(budget_sort_key)
        else:
            keys[f"_{column}"] = table[column].astype(str)
    order = keys.sort_values(list(keys.columns)).index
    return table.loc[order].reset_index(drop=True)


def _column_order(table: pd.DataFrame, by: list[str], split: list[str]) -> list[str]:
    subsets = [c for c in table.columns if c.startswith("accuracy[")]
    figures = [f.key for f in FIGURES]
    head = [*by, *split, "settings", "method_settings", "runs", "pooled", "n", "n_errors", "n_unscored",
            "accuracy", "acc_ci_low", "acc_ci_high", "accuracy_micro", *subsets, *_PAIRED[:-1],
            *figures[:6], "speedup_bound", "ttft_basis", *figures[6:], "speedup", "peak_mem_source"]  # fmt: skip
    return list(dict.fromkeys(head))


def report(paths: Sequence[Path], by: Sequence[str] = DEFAULT_BY, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """``aggregate(load_runs(paths))``: the report frame for run directories (or dirs holding runs)."""
    from tokbench.store import load_runs

    return aggregate(load_runs(list(paths)), by, n_boot, seed)


# --- presentation ---------------------------------------------------------------------------------
def _fmt(value: object, spec: str, suffix: str = "") -> str:
    return "—" if value is None or pd.isna(value) else format(value, spec) + suffix


def _points_ci(row: pd.Series, mean: str, low: str, high: str, sign: str = "+") -> str:
    if pd.isna(row[mean]) or pd.isna(row[low]):
        return "—"
    return f"{row[mean] * 100:{sign}.1f} [{row[low] * 100:{sign}.1f}, {row[high] * 100:{sign}.1f}]"


def _diff_ci(row: pd.Series) -> str:
    return "—" if row["method"] == REFERENCE else _points_ci(row, "acc_diff", "acc_diff_ci_low", "acc_diff_ci_high")


def _n(row: pd.Series) -> str:
    notes = [f"{row['n_errors']} err"] if row["n_errors"] else []
    notes += [f"{int(row['n_unscored'])} unjudged"] if pd.notna(row.get("n_unscored")) and row["n_unscored"] else []
    return f"{row['n']}" + (f" ({', '.join(notes)})" if notes else "")


def _settings(row: pd.Series) -> str:
    return "; ".join(part for part in (row["settings"], row["method_settings"], row["pooled"]) if part)


def _number(column: str, spec: str, scale: float = 1.0, suffix: str = ""):
    return lambda t: (t[column] * scale).map(lambda v: _fmt(v, spec, suffix))


DISPLAY = {  # display column → its strings from ``aggregate``'s frame
    "settings": lambda t: t.apply(_settings, axis=1),
    "n": lambda t: t.apply(_n, axis=1),
    "acc": _number("accuracy", ".1f", 100),
    "acc [95% CI]": lambda t: t.apply(lambda r: _points_ci(r, "accuracy", "acc_ci_low", "acc_ci_high", ""), axis=1),
    "acc pooled": _number("accuracy_micro", ".1f", 100),
    "rel. full": _number("acc_rel_full_pct", ".1f", suffix="%"),
    "diff vs full [95% CI]": lambda t: t.apply(_diff_ci, axis=1),
    "agree": _number("agreement", ".1f", 100, "%"),
    "ret.": _number("retention", ".3f"),
    "ret. in": _number("retention_input", ".3f"),
    "ret. final": _number("retention_final", ".3f"),
    "ret. layer": _number("retention_layer_avg", ".3f"),
    "FLOPs LLM": _number("flops_ratio_llm", ".3f"),
    "FLOPs total": _number("flops_ratio_total", ".3f"),
    "bound": _number("speedup_bound", ".2f", suffix="x"),
    "TTFT ms": _number("ttft_ms", ".1f"),
    "TTFT is": lambda t: t["ttft_basis"].fillna("—").astype(str),
    "p50": _number("ttft_p50_ms", ".1f"),
    "p90": _number("ttft_p90_ms", ".1f"),
    "TTFT batch ms": _number("ttft_batch_ms", ".1f"),
    "speedup": _number("speedup", ".2f", suffix="x"),
    "e2e ms": _number("e2e_ms", ".1f"),
    "decode ms/tok": _number("decode_ms_per_token", ".2f"),
    "KV MB": _number("kv_cache_mb", ".2f"),
    "peak MB": _number("peak_mem_mb", ".0f"),
    "NVML MB": _number("nvml_peak_mb", ".0f"),
}
# The terminal's default: what a reader needs to compare methods, about 100 columns wide.
COMPACT = ("settings", "n", "acc", "diff vs full [95% CI]", "agree", "ret.", "FLOPs total", "FLOPs LLM", "TTFT ms",
           "speedup", "peak MB")  # fmt: skip
# Dropped first, in this order, when a table must fit a width.
FIT_DROP = ("agree", "TTFT is", "FLOPs LLM", "FLOPs total", "peak MB", "ret.", "speedup", "diff vs full [95% CI]", "TTFT ms")


def display_frame(table: pd.DataFrame, columns: Sequence[str] | None = None, drop_empty: bool = False) -> pd.DataFrame:
    """The human view of ``aggregate``'s frame: the grouping columns, then ``columns`` of ``DISPLAY``
    (all by default) as formatted strings; accuracy in points (100 x score). ``drop_empty`` leaves
    out columns without a value in any row."""
    columns = list(DISPLAY) if columns is None else list(columns)
    unknown = [c for c in columns if c not in DISPLAY]
    if unknown:
        raise ReportError(f"unknown column(s) {', '.join(unknown)}; use some of {', '.join(DISPLAY)}")
    by = [c for c in table.columns if c in _GROUPABLE]
    shown = pd.DataFrame({c: table[c].astype(str) for c in by})
    for column in columns:
        shown[column] = DISPLAY[column](table) if len(table) else pd.Series(dtype=str)
    if drop_empty:
        shown = shown.drop(columns=[c for c in columns if _empty(shown[c])])
    return shown


def caption(table: pd.DataFrame) -> str:
    """What the numbers are: points, CIs, agreement, and which TTFT the time columns hold."""
    bases = sorted(set(table["ttft_basis"].dropna()))
    times = f"; times: {bases[0]}" if len(bases) == 1 else "; times: see 'TTFT is'" if bases else ""
    return f"acc and diff in points; CI: bootstrap 95%; agree: same answer as full{times}"


def _empty(column: pd.Series) -> bool:
    return column.isin(["—", ""]).all()


def rich_table(table: pd.DataFrame, title: str = "tokbench report", columns: Sequence[str] | None = None,
               width: int | None = None):  # fmt: skip
    """The terminal view. Grouping columns with one value move to the title. ``columns`` as in
    ``display_frame`` (default ``COMPACT``, without columns that are empty everywhere, and FLOPs LLM
    only where no total is recorded); with ``width``, ``FIT_DROP`` columns go until the table fits."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    compact = columns is None
    shown = display_frame(table, COMPACT if compact else columns, drop_empty=compact)
    constant = [c for c in shown.columns if c in _GROUPABLE and c not in ("method", "budget") and shown[c].nunique() == 1]
    if constant:
        title = f"{title}: " + " · ".join(shown[c].iloc[0] for c in constant)
    shown = shown.drop(columns=constant)
    if compact:
        if "FLOPs total" in shown:
            shown = shown.drop(columns="FLOPs LLM", errors="ignore")
        if table["ttft_basis"].nunique() > 1:  # rows hold different TTFTs: say which, beside each
            shown.insert(list(shown.columns).index("TTFT ms") + 1, "TTFT is", DISPLAY["TTFT is"](table).to_numpy())

    def build(frame: pd.DataFrame) -> Table:
        out = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, caption=caption(table))
        for column in frame.columns:
            grouping = column in _GROUPABLE
            out.add_column(column, justify="left" if grouping else "right", no_wrap=grouping)
        for row in frame.itertuples(index=False):
            out.add_row(*row)
        return out

    rendered = build(shown)
    for column in FIT_DROP if width else ():
        if Console(width=10_000).measure(rendered).maximum <= width:
            break
        if column in shown:
            shown = shown.drop(columns=column)
            rendered = build(shown)
    return rendered


def _align(shown: pd.DataFrame) -> tuple[str, ...]:
    return tuple("left" if c in _GROUPABLE or c == "settings" else "right" for c in shown.columns)


def to_markdown(table: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    shown = display_frame(table, columns, drop_empty=columns is None)
    return shown.to_markdown(index=False, disable_numparse=True, colalign=_align(shown)) + "\n"


def to_latex(table: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    shown = display_frame(table, columns, drop_empty=columns is None)
    shown.columns = [c.replace("%", "\\%") for c in shown.columns]
    shown = shown.apply(lambda col: col.str.replace("%", "\\%", regex=False).str.replace("_", "\\_", regex=False))
    column_format = "".join("l" if a == "left" else "r" for a in _align(shown))
    return shown.to_latex(index=False, escape=False, column_format=column_format)


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False, float_format="%.6g")


def to_json(table: pd.DataFrame) -> str:
    return table.to_json(orient="records", indent=2) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}
FILE_NAMES = {"md": "report.md", "csv": "report.csv", "latex": "report.tex"}


def write_files(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write report.md, report.csv and report.tex into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, name in FILE_NAMES.items():
        path = out_dir / name
        path.write_text(RENDERERS[fmt](table), encoding="utf-8")
        written.append(path)
    return written
