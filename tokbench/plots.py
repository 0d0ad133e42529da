"""Paper figures from finished runs: PNG and vector PDF, one look for every method across figures.

Every figure is drawn from ``tokbench.report.aggregate``'s frame (one row per model, method,
budget, task), so a figure never disagrees with the table. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas, without pyplot: no global backend state, no
display needed. One set of figures per (model, task); file names get a ``__<model>__<task>`` suffix
when the runs hold more than one.

Kinds (``KINDS``): ``accuracy_retention`` (one line per method, ``full`` as a dashed reference line),
``ttft_retention``, ``pareto`` (accuracy vs TTFT, the non-dominated points joined), ``memory``
(peak-memory bars).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tokbench.report import REFERENCE, aggregate

KINDS = ("accuracy_retention", "ttft_retention", "pareto", "memory")
FORMATS = ("png", "pdf")

# Fixed looks for known methods (Okabe-Ito / tab10 colours, distinct markers); others are hashed.
STYLES: dict[str, tuple[str, str]] = {
    "full": ("#000000", "*"),
    "random": ("#999999", "o"),
    "pool": ("#E69F00", "s"),
    "downsample": ("#56B4E9", "v"),
    "fastv": ("#009E73", "^"),
    "visionzip": ("#D55E00", "D"),
    "vscan": ("#CC79A7", "P"),
    "divprune": ("#0072B2", "X"),
    "cdpruner": ("#8C564B", "h"),
    "pyramiddrop": ("#7F7F00", "<"),
    "glimpseprune": ("#E41A1C", ">"),
}
_SPARE_COLOURS = ("#1F77B4", "#FF7F0E", "#2CA02C", "#9467BD", "#17BECF", "#BCBD22", "#E377C2", "#393B79", "#637939", "#843C39")
_SPARE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "d")

RC = {
    "figure.figsize": (4.0, 3.0),
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "lines.markersize": 6,
    "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
    "ps.fonttype": 42,
    "savefig.dpi": 200,
}


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method: fixed for known methods, from a stable hash (md5, not ``hash``) otherwise."""
    if method in STYLES:
        return STYLES[method]
    digest = int(hashlib.md5(method.encode()).hexdigest(), 16)
    return _SPARE_COLOURS[digest % len(_SPARE_COLOURS)], _SPARE_MARKERS[(digest // 7) % len(_SPARE_MARKERS)]


def pareto_front(points: pd.DataFrame, x: str = "ttft_ms", y: str = "accuracy") -> pd.DataFrame:
    """Rows not dominated by another (lower or equal ``x`` and higher or equal ``y``, one strictly), by ``x``."""
    ordered = points.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False])
    best, keep = float("-inf"), []
    for index, row in ordered.iterrows():
        if row[y] > best:
            keep.append(index)
            best = row[y]
    return ordered.loc[keep]


def _lines(table: pd.DataFrame):
    """(index, number of methods, method, its rows sorted by retention) for each method but the reference."""
    methods = table[table["method"] != REFERENCE].groupby("method", sort=True)
    for index, (method, rows) in enumerate(methods):
        yield index, len(methods), method, rows.sort_values("retention")


def _reference(ax, table: pd.DataFrame, y: str, scale: float = 1.0) -> None:
    """``full``: a dashed horizontal line at its value and its marker at its retention (1.0)."""
    full = table[table["method"] == REFERENCE]
    if full.empty:
        return
    colour, marker = method_style(REFERENCE)
    ax.axhline(full[y].iloc[0] * scale, color=colour, linestyle="--", linewidth=1, zorder=1)
    ax.plot(full["retention"], full[y] * scale, color=colour, marker=marker, markersize=9, linestyle="none", label=REFERENCE)


def _accuracy_retention(ax, table: pd.DataFrame) -> None:
    span = max(table["retention"].max() - table["retention"].min(), 0.1)
    for index, count, method, rows in _lines(table):
        acc = rows["accuracy"] * 100
        yerr = [(acc - rows["acc_ci_low"] * 100).clip(lower=0), (rows["acc_ci_high"] * 100 - acc).clip(lower=0)]
        dodge = (index - (count - 1) / 2) * 0.008 * span  # overlapping CIs at one retention stay apart
        colour, marker = method_style(method)
        bars = ax.errorbar(rows["retention"] + dodge, acc, yerr=yerr, color=colour, marker=marker, label=method,
                           capsize=2, elinewidth=0.8)  # fmt: skip
        bars[-1][0].set_alpha(0.5)
    _reference(ax, table, "accuracy", 100)
    _accuracy_limits(ax)
    ax.set_xlabel("visual-token retention")
    ax.set_ylabel("accuracy (%, 95% CI)")


def _accuracy_limits(ax, min_span: float = 10.0) -> None:
    """Keep the accuracy axis inside [0, 100] (with a margin) and at least ``min_span`` points tall,
    so equal accuracies (all 0, say) draw as a flat line rather than a magnified ±0.04 axis."""
    low, high = ax.get_ylim()
    low, high = max(low, -2.0), min(high, 102.0)
    if high - low < min_span:
        centre = (low + high) / 2
        low = max(-2.0, centre - min_span / 2)
        high = low + min_span
    ax.set_ylim(low, high)


def _ttft_retention(ax, table: pd.DataFrame) -> None:
    for _, _, method, rows in _lines(table):
        colour, marker = method_style(method)
        ax.plot(rows["retention"], rows["ttft_ms"], color=colour, marker=marker, label=method)
    _reference(ax, table, "ttft_ms")
    ax.set_xlabel("visual-token retention")
    ax.set_ylabel("TTFT (ms, mean)")
    ax.set_ylim(0, table["ttft_ms"].max() * 1.1)


def _pareto(ax, table: pd.DataFrame) -> None:
    points = table.assign(acc=table["accuracy"] * 100)
    front = pareto_front(points, "ttft_ms", "acc")
    ax.step(front["ttft_ms"], front["acc"], where="post", color="#444444", linewidth=1, alpha=0.6, label="Pareto front", zorder=1)
    for method, rows in points.groupby("method", sort=True):
        colour, marker = method_style(method)
        ax.scatter(rows["ttft_ms"], rows["acc"], color=colour, marker=marker, label=method, zorder=3,
                   s=60 if method == REFERENCE else 30)  # fmt: skip
        for row in rows.itertuples():
            if method != REFERENCE:
                ax.annotate(str(row.budget), (row.ttft_ms, row.acc), textcoords="offset points", xytext=(4, 3), fontsize=7)
    _accuracy_limits(ax)
    ax.set_xlabel("TTFT (ms, mean)")
    ax.set_ylabel("accuracy (%)")


def _memory(ax, table: pd.DataFrame) -> None:
    rows = table.dropna(subset=["peak_mem_mb"]).reset_index(drop=True)
    colours = [method_style(m)[0] for m in rows["method"]]
    labels = [m if m == REFERENCE else f"{m}\n{b}" for m, b in zip(rows["method"], rows["budget"], strict=True)]
    bars = ax.bar(range(len(rows)), rows["peak_mem_mb"], color=colours, edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)), labels, rotation=45 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center")
    source = ",".join(sorted(set(rows["peak_mem_source"].dropna()))) or "?"
    ax.set_ylabel(f"peak memory (MB, {source})")
    ax.grid(axis="x", visible=False)


DRAW = {"accuracy_retention": _accuracy_retention, "ttft_retention": _ttft_retention, "pareto": _pareto, "memory": _memory}
NEEDS = {"accuracy_retention": ("accuracy", "retention"), "ttft_retention": ("ttft_ms", "retention"),
         "pareto": ("accuracy", "ttft_ms"), "memory": ("peak_mem_mb",)}  # fmt: skip


def _slug(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", str(text)).strip("-.") or "none"


def plot_table(table: pd.DataFrame, out_dir: Path, kinds: Sequence[str] = KINDS, formats: Sequence[str] = FORMATS) -> tuple[list[Path], list[str]]:
    """Draw ``kinds`` for each (model, task) of ``aggregate``'s frame into ``out_dir``.

    Returns (written files, skipped notes): a kind is skipped when a figure it needs is missing from
    every row (e.g. no scores, or no peak memory).
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown figure kind(s) {', '.join(unknown)}; use {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = list(table.groupby(["model", "task"], sort=True))
    written, skipped = [], []
    with rc_context(RC):
        for (model, task), rows in groups:
            suffix = f"__{_slug(model)}__{_slug(task)}" if len(groups) > 1 else ""
            for kind in kinds:
                missing = [c for c in NEEDS[kind] if rows[c].isna().all()]
                if missing:
                    skipped.append(f"{kind}{suffix}: no {', '.join(missing)} recorded")
                    continue
                fig = Figure()
                FigureCanvasAgg(fig)
                ax = fig.add_subplot()
                DRAW[kind](ax, rows)
                ax.set_title(f"{task} · {model}")
                handles, labels = ax.get_legend_handles_labels()
                if handles and kind != "memory":  # outside the axes: never hides a point; full first
                    order = sorted(range(len(labels)), key=lambda i: (labels[i] != REFERENCE, labels[i] == "Pareto front", i))
                    ax.legend([handles[i] for i in order], [labels[i] for i in order], frameon=False,
                              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # fmt: skip
                for fmt in formats:
                    path = out_dir / f"{kind}{suffix}.{fmt}"
                    fig.savefig(path, bbox_inches="tight")
                    written.append(path)
    return written, skipped


def plot(paths: Sequence[Path], out_dir: Path, kinds: Sequence[str] = KINDS, formats: Sequence[str] = FORMATS) -> tuple[list[Path], list[str]]:
    """Figures for the runs in ``paths`` (run dirs or dirs holding runs)."""
    from tokbench.store import load_runs

    return plot_table(aggregate(load_runs(list(paths)), ("model", "method", "budget", "task")), out_dir, kinds, formats)
