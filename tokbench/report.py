"""Tables over finished runs: one row per (method, budget, task), compared with the `full` baseline.

Reports read files, never internals: ``aggregate`` takes the tidy per-sample frame of
``tokbench.store.load_runs`` and rebuilds every figure with pandas. Rows with an ``error`` are
counted in ``n_errors`` and left out of every figure, as in ``tokbench.summary.summarize`` (a test
checks the two agree on a single run).

Columns of ``aggregate``'s frame (fractions are 0-1; "points" are 100 x a score difference):

==========================  ========================================================================
``n``, ``n_errors``          samples, and samples whose row carries an error
``accuracy``                 mean score
``acc_ci_low/high``          bootstrap 95% CI of that mean (resampling documents)
``acc_rel_full_pct``         accuracy / accuracy of ``full`` on the same task, in %
``acc_diff``                 mean paired score difference to ``full`` over the documents both scored
``acc_diff_ci_low/high``     paired bootstrap 95% CI of ``acc_diff`` (same resampled documents for both)
``n_paired``                 documents in that pairing
``retention``, ...           mean headline / input / final / layer-averaged retention
``flops_ratio``              mean prefill FLOPs relative to unpruned
``ttft_ms``, ``ttft_p50_ms``, ``ttft_p90_ms``   TTFT mean and percentiles (linear interpolation)
``speedup``                  mean TTFT of ``full`` / mean TTFT of this row
``peak_mem_mb``              largest peak memory of any sample (``peak_mem_source`` says which kind)
==========================  ========================================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_BY: tuple[str, ...] = ("method", "budget", "task")
REFERENCE = "full"
N_BOOT = 2000
NUMERIC = ("score", "retention", "retention_input", "retention_final", "retention_layer_avg", "flops_ratio",
           "ttft_ms", "e2e_ms", "kv_cache_mb", "peak_mem_mb")  # fmt: skip
_GROUPABLE = ("model", "method", "budget", "task", "run_id", "run_dir")


class ReportError(ValueError):
    """Nothing to report on, or a grouping that cannot be used."""


# --- statistics -----------------------------------------------------------------------------------
def bootstrap_ci(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``values.mean()``, resampling entries with replacement.

    Pass per-document differences ``a - b`` for a paired CI. Seeded: the same input gives the same
    interval; resamples are drawn in chunks so memory stays bounded for large tasks.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, 2_000_000 // values.size)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, values.size, size=(min(chunk, n_boot - start), values.size))
        means.append(values[idx].mean(axis=1))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return float(low), float(high)


# --- aggregation ----------------------------------------------------------------------------------
def budget_sort_key(label: object) -> tuple[int, float]:
    """Order budget labels: ratios ascending (``r0.111`` < ``r0.25`` < ``r1``), then counts, then the rest."""
    match = re.fullmatch(r"(r|n|dyn)([0-9.]+)", str(label))
    if not match:
        return (3, 0.0)
    return ({"r": 0, "n": 1, "dyn": 2}[match.group(1)], float(match.group(2)))


def resolve_by(samples: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> list[str]:
    """Check the grouping columns; add ``model`` in front when runs of several models are mixed, so
    accuracies of different models are never averaged together."""
    by = [b.strip() for b in by if b.strip()]
    unknown = [b for b in by if b not in _GROUPABLE]
    if unknown:
        raise ReportError(f"cannot group by {', '.join(unknown)}; use some of {', '.join(_GROUPABLE)}")
    if "method" not in by:
        raise ReportError("--by must include method")
    if "model" not in by and samples["model"].nunique(dropna=True) > 1:
        by = ["model", *by]
    return list(dict.fromkeys(by))


def _per_doc_scores(ok: pd.DataFrame, by: list[str]) -> dict[tuple, pd.Series]:
    """Group key → mean score per doc id (several runs of one cell average per document)."""
    scored = ok[ok["score"].notna()]
    return {key: group.groupby("doc_id")["score"].mean() for key, group in scored.groupby(by, sort=False)}


def aggregate(samples: pd.DataFrame, by: Sequence[str] = DEFAULT_BY, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per group of ``by`` (see the module docstring for the columns), ``full`` first."""
    if samples.empty:
        raise ReportError("no samples to report on")
    by = resolve_by(samples, by)
    df = samples.copy()
    df[list(NUMERIC)] = df[list(NUMERIC)].apply(pd.to_numeric, errors="coerce")
    df["failed"] = df["error"].notna()
    df["peak_mem_source"] = df["peak_mem_source"].astype(object)
    ok = df[~df["failed"]]

    table = df.groupby(by, sort=False).agg(n=("doc_id", "size"), n_errors=("failed", "sum"))
    stats = ok.groupby(by, sort=False).agg(
        accuracy=("score", "mean"),
        retention=("retention", "mean"),
        retention_input=("retention_input", "mean"),
        retention_final=("retention_final", "mean"),
        retention_layer_avg=("retention_layer_avg", "mean"),
        flops_ratio=("flops_ratio", "mean"),
        ttft_ms=("ttft_ms", "mean"),
        ttft_p50_ms=("ttft_ms", lambda s: s.quantile(0.5)),
        ttft_p90_ms=("ttft_ms", lambda s: s.quantile(0.9)),
        e2e_ms=("e2e_ms", "mean"),
        kv_cache_mb=("kv_cache_mb", "mean"),
        peak_mem_mb=("peak_mem_mb", "max"),
        peak_mem_source=("peak_mem_source", lambda s: ",".join(sorted(set(s.dropna()))) or None),
    )
    table = table.join(stats).reset_index()
    table["n_errors"] = table["n_errors"].astype(int)

    ref_keys = [c for c in by if c not in ("method", "budget")]
    scores = _per_doc_scores(ok, by)
    full = table[table["method"] == REFERENCE]
    if full.duplicated(ref_keys).any() if ref_keys else len(full) > 1:
        raise ReportError(f"more than one {REFERENCE!r} row per {', '.join(ref_keys) or 'report'}; narrow the runs or --by")
    full_of = {tuple(r[k] for k in ref_keys): r for _, r in full.iterrows()}

    extra = []
    for _, row in table.iterrows():
        ref = full_of.get(tuple(row[k] for k in ref_keys))
        own = scores.get(tuple(row[b] for b in by), pd.Series(dtype=float))
        acc_low, acc_high = bootstrap_ci(own.to_numpy(), n_boot, seed)
        values = {"acc_ci_low": acc_low, "acc_ci_high": acc_high}
        if ref is not None:
            ref_scores = scores.get(tuple(ref[b] for b in by), pd.Series(dtype=float))
            paired = pd.concat([own, ref_scores], axis=1, join="inner").dropna()
            diffs = (paired.iloc[:, 0] - paired.iloc[:, 1]).to_numpy()
            low, high = bootstrap_ci(diffs, n_boot, seed)
            is_ref = row["method"] == REFERENCE  # 100% of itself by definition, even at accuracy 0
            values.update(
                acc_rel_full_pct=100.0 if is_ref else _ratio(row["accuracy"], ref["accuracy"]) * 100,
                acc_diff=float(diffs.mean()) if diffs.size else float("nan"),
                acc_diff_ci_low=low,
                acc_diff_ci_high=high,
                n_paired=int(diffs.size),
                speedup=_ratio(ref["ttft_ms"], row["ttft_ms"]),
            )
        extra.append(values)
    table = pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1)
    for column in ("acc_rel_full_pct", "acc_diff", "acc_diff_ci_low", "acc_diff_ci_high", "n_paired", "speedup"):
        if column not in table:
            table[column] = np.nan
    table["n_paired"] = table["n_paired"].astype("Int64")
    return _sorted(table, by)[_column_order(by)]


def _ratio(numerator: float, denominator: float) -> float:
    if pd.isna(numerator) or pd.isna(denominator) or denominator == 0:
        return float("nan")
    return float(numerator) / float(denominator)


def _sorted(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    keys = pd.DataFrame(index=table.index)
    for column in by:
        if column == "method":
            keys["_method"] = table["method"].ne(REFERENCE).astype(int).astype(str) + table["method"].astype(str)
        elif column == "budget":
            keys["_budget"] = table["budget"].map(budget_sort_key)
        else:
            keys[f"_{column}"] = table[column].astype(str)
    order = keys.sort_values(list(keys.columns)).index
    return table.loc[order].reset_index(drop=True)


def _column_order(by: list[str]) -> list[str]:
    return [
        *by, "n", "n_errors", "accuracy", "acc_ci_low", "acc_ci_high", "acc_rel_full_pct",
        "acc_diff", "acc_diff_ci_low", "acc_diff_ci_high", "n_paired",
        "retention", "retention_input", "retention_final", "retention_layer_avg", "flops_ratio",
        "ttft_ms", "ttft_p50_ms", "ttft_p90_ms", "speedup", "e2e_ms", "kv_cache_mb", "peak_mem_mb", "peak_mem_source",
    ]  # fmt: skip


def report(paths: Sequence[Path], by: Sequence[str] = DEFAULT_BY, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """``aggregate(load_runs(paths))``: the report frame for run directories (or dirs holding runs)."""
    from tokbench.store import load_runs

    return aggregate(load_runs(list(paths)), by, n_boot, seed)


# --- presentation ---------------------------------------------------------------------------------
def _fmt(value: object, spec: str) -> str:
    return "—" if value is None or pd.isna(value) else format(value, spec)


def _diff_ci(row: pd.Series) -> str:
    if row["method"] == REFERENCE or pd.isna(row["acc_diff"]):
        return "—"
    return f"{row['acc_diff'] * 100:+.1f} [{row['acc_diff_ci_low'] * 100:+.1f}, {row['acc_diff_ci_high'] * 100:+.1f}]"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The human view of ``aggregate``'s frame: formatted strings, accuracy in points."""
    by = [c for c in table.columns if c in _GROUPABLE]
    shown = pd.DataFrame({c: table[c].astype(str) for c in by})
    shown["n"] = table["n"].astype(str) + table["n_errors"].map(lambda e: f" ({e} err)" if e else "")
    shown["acc"] = (table["accuracy"] * 100).map(lambda v: _fmt(v, ".1f"))
    shown["rel. full"] = table["acc_rel_full_pct"].map(lambda v: _fmt(v, ".1f") + ("%" if pd.notna(v) else ""))
    shown["diff vs full [95% CI]"] = table.apply(_diff_ci, axis=1)
    for column, label in (("retention", "ret."), ("retention_input", "ret. in"), ("retention_final", "ret. final"),
                          ("retention_layer_avg", "ret. layer"), ("flops_ratio", "FLOPs")):  # fmt: skip
        shown[label] = table[column].map(lambda v: _fmt(v, ".3f"))
    for column, label in (("ttft_ms", "TTFT ms"), ("ttft_p50_ms", "p50"), ("ttft_p90_ms", "p90")):
        shown[label] = table[column].map(lambda v: _fmt(v, ".1f"))
    shown["speedup"] = table["speedup"].map(lambda v: _fmt(v, ".2f") + ("x" if pd.notna(v) else ""))
    shown["peak MB"] = table["peak_mem_mb"].map(lambda v: _fmt(v, ".0f"))
    return shown


def rich_table(table: pd.DataFrame, title: str = "tokbench report"):
    """The terminal view: ``display_frame`` with single-valued grouping columns moved to the title and
    the retention split and TTFT percentiles folded into one column each, so it fits a terminal."""
    from rich import box
    from rich.table import Table

    shown = display_frame(table)
    constant = [c for c in shown.columns if c in _GROUPABLE and c not in ("method", "budget") and shown[c].nunique() == 1]
    if constant:
        title = f"{title}: " + " · ".join(shown[c].iloc[0] for c in constant)
    shown = shown.drop(columns=constant)
    shown["ret. in/final/layer"] = shown["ret. in"] + "/" + shown["ret. final"] + "/" + shown["ret. layer"]
    shown["TTFT ms (p50/p90)"] = shown["TTFT ms"] + " (" + shown["p50"] + "/" + shown["p90"] + ")"
    order = [c for c in shown.columns if c in _GROUPABLE]
    order += ["n", "acc", "rel. full", "diff vs full [95% CI]", "ret.", "ret. in/final/layer", "FLOPs",
              "TTFT ms (p50/p90)", "speedup", "peak MB"]  # fmt: skip
    out = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD,
                caption="acc and diff in points; CI: paired bootstrap, 95%")  # fmt: skip
    for column in order:
        grouping = column in _GROUPABLE
        out.add_column(column, justify="left" if grouping else "right", no_wrap=grouping)
    for row in shown[order].itertuples(index=False):
        out.add_row(*row)
    return out


def _align(shown: pd.DataFrame) -> tuple[str, ...]:
    return tuple("left" if c in _GROUPABLE else "right" for c in shown.columns)


def to_markdown(table: pd.DataFrame) -> str:
    shown = display_frame(table)
    return shown.to_markdown(index=False, disable_numparse=True, colalign=_align(shown)) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    shown = display_frame(table).rename(columns={"diff vs full [95% CI]": "diff vs full [95\\% CI]"})
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
