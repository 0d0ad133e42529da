"""Paper figures from finished runs: PNG and vector PDF, one look for every method across figures.

Every figure is drawn from ``tokbench.report.aggregate``'s frame (one row per model, method,
budget, task and splitting setting), so a figure never disagrees with the table. Figures are built
on ``matplotlib.figure.Figure`` with the Agg canvas, without pyplot: no global backend state, no
display needed. One set of figures per (model, task, settings): runs that differ in batch size,
limit, ... are never drawn as one line; file names get a ``__<model>__<task>[__<settings>]`` suffix
when the runs hold more than one set. A method whose runs differ in a method setting gets one line
per setting (``fastv (method_args.k=2)``).

Kinds (``KINDS``): ``accuracy_retention`` (one line per method, ``full`` as a dashed reference line),
``ttft_retention``, ``pareto`` (accuracy vs TTFT: each method's budgets joined by a thin line,
budget labels placed where they overlap no other label or point, with a leader line when moved
away; the non-dominated points ringed and joined by a dashed step line), ``memory`` (horizontal peak-memory
bars, one labelled row per method and budget).
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
from matplotlib.text import Text

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


def _series_label(row: pd.Series) -> str:
    extra = row.get("method_settings") or ""
    return f"{row['method']} ({extra})" if extra else str(row["method"])


def _lines(table: pd.DataFrame):
    """(index, number of lines, label, method, its rows sorted by retention) for each line but the reference."""
    others = table[table["method"] != REFERENCE]
    lines = others.assign(_label=others.apply(_series_label, axis=1) if len(others) else []).groupby("_label", sort=True)
    for index, (label, rows) in enumerate(lines):
        yield index, len(lines), label, rows["method"].iloc[0], rows.sort_values("retention")


def _reference(ax, table: pd.DataFrame, y: str, scale: float = 1.0) -> None:
    """``full``: a dashed horizontal line at its value and its marker at its retention (1.0); the
    legend entry shows both."""
    full = table[table["method"] == REFERENCE]
    if full.empty:
        return
    colour, marker = method_style(REFERENCE)
    ax.axhline(full[y].iloc[0] * scale, color=colour, linestyle="--", linewidth=1, zorder=1)
    ax.plot(full["retention"], full[y] * scale, color=colour, marker=marker, markersize=9, linestyle="--", linewidth=1,
            label=REFERENCE)  # fmt: skip


def _accuracy_retention(ax, table: pd.DataFrame) -> None:
    span = max(table["retention"].max() - table["retention"].min(), 0.1)
    for index, count, label, method, rows in _lines(table):
        acc = rows["accuracy"] * 100
        yerr = [(acc - rows["acc_ci_low"] * 100).clip(lower=0), (rows["acc_ci_high"] * 100 - acc).clip(lower=0)]
        dodge = (index - (count - 1) / 2) * 0.008 * span  # overlapping CIs at one retention stay apart
        colour, marker = method_style(method)
        bars = ax.errorbar(rows["retention"] + dodge, acc, yerr=yerr, color=colour, marker=marker, label=label,
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
    for _, _, label, method, rows in _lines(table):
        colour, marker = method_style(method)
        ax.plot(rows["retention"], rows["ttft_ms"], color=colour, marker=marker, label=label)
    _reference(ax, table, "ttft_ms")
    ax.set_xlabel("visual-token retention")
    ax.set_ylabel(_ttft_label(table))
    ax.set_ylim(0, table["ttft_ms"].max() * 1.1)


def _ttft_label(table: pd.DataFrame) -> str:
    """The axis label says which TTFT it is: amortised per sample (batch / b) or the batch latency."""
    bases = " | ".join(sorted(set(table["ttft_basis"].dropna())))
    return f"TTFT (ms, mean; {bases})" if bases else "TTFT (ms, mean)"


def _pareto(ax, table: pd.DataFrame) -> None:
    points = table.assign(acc=table["accuracy"] * 100)
    front = pareto_front(points, "ttft_ms", "acc")
    ax.step(front["ttft_ms"], front["acc"], where="post", color="#444444", linestyle="--", linewidth=1.2, marker="o",
            markersize=12, markerfacecolor="none", markeredgewidth=0.8, label="Pareto front", zorder=2)  # fmt: skip
    full = points[points["method"] == REFERENCE]
    colour, marker = method_style(REFERENCE)
    ax.scatter(full["ttft_ms"], full["acc"], color=colour, marker=marker, s=80, label=REFERENCE, zorder=3)
    labels = []
    for _, _, label, method, rows in _lines(points):
        colour, marker = method_style(method)
        rows = rows.dropna(subset=["ttft_ms", "acc"])
        ax.plot(rows["ttft_ms"], rows["acc"], color=colour, marker=marker, linewidth=0.6, alpha=0.9, label=label, zorder=3)
        labels += [(str(r.budget), r.ttft_ms, r.acc, colour) for r in rows.itertuples()]
    _accuracy_limits(ax)
    ax.set_xlabel(_ttft_label(table))
    ax.set_ylabel("accuracy (%)")
    ax.autoscale_view()  # final limits before measuring where labels go
    place_labels(ax, labels)


# Offsets (points) tried for a label, nearest first; a leader line in the method's colour joins it to its point.
_OFFSETS = [(dx * r, dy * r) for r in (8, 14, 21, 30) for dx, dy in ((1, 0.5), (-1, 0.5), (1, -0.7), (-1, -0.7), (0.3, 1.3), (0.3, -1.5))]


def place_labels(ax, labels: list[tuple[str, float, float, str]]) -> list:
    """Annotate (text, x, y, colour) points so no label overlaps another label or a data marker:
    each takes the first free offset of ``_OFFSETS`` inside the axes, with a leader line to its point;
    a label with no free place is left out. Returns the annotations drawn."""
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    taken = [_marker_box(*to_px((x, y)), figure.dpi) for _, x, y, _ in labels]
    drawn = []
    for text, x, y, colour in labels:
        for dx, dy in _OFFSETS:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6.5, color="#333333",
                               ha="left" if dx > 0 else "right" if dx < 0 else "center", va="center",
                               arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.6, "shrinkA": 0,
                                           "shrinkB": 2})  # fmt: skip
            note.update_positions(renderer)
            extent = Text.get_window_extent(note, renderer).expanded(1.05, 1.1)  # the text, not its leader line
            inside = box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1
            if inside and not any(extent.overlaps(other) for other in taken):
                taken.append(extent)
                drawn.append(note)
                break
            note.remove()
    return drawn


def _marker_box(x: float, y: float, dpi: float, size_pt: float = 6.0):
    from matplotlib.transforms import Bbox

    half = size_pt / 72 * dpi / 2
    return Bbox([[x - half, y - half], [x + half, y + half]])


def _memory(ax, table: pd.DataFrame) -> None:
    """Horizontal bars, one row per method and budget (``full`` on top), the value at each bar's end."""
    rows = table.dropna(subset=["peak_mem_mb"]).reset_index(drop=True)
    colours = [method_style(m)[0] for m in rows["method"]]
    labels = [_series_label(r) + ("" if r["method"] == REFERENCE else f"  {r['budget']}") for _, r in rows.iterrows()]
    bars = ax.barh(range(len(rows)), rows["peak_mem_mb"], color=colours, edgecolor="black", linewidth=0.5, height=0.7)
    ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, rows["peak_mem_mb"].max() * 1.15)
    source = ",".join(sorted(set(rows["peak_mem_source"].dropna()))) or "?"
    ax.set_xlabel(f"peak memory (MB, {source})")
    ax.grid(axis="y", visible=False)
    ax.figure.set_size_inches(RC["figure.figsize"][0], max(RC["figure.figsize"][1], 0.9 + 0.2 * len(rows)))


DRAW = {"accuracy_retention": _accuracy_retention, "ttft_retention": _ttft_retention, "pareto": _pareto, "memory": _memory}
NEEDS = {"accuracy_retention": ("accuracy", "retention"), "ttft_retention": ("ttft_ms", "retention"),
         "pareto": ("accuracy", "ttft_ms"), "memory": ("peak_mem_mb",)}  # fmt: skip


def _slug(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", str(text)).strip("-.") or "none"


def plot_table(table: pd.DataFrame, out_dir: Path, kinds: Sequence[str] = KINDS, formats: Sequence[str] = FORMATS) -> tuple[list[Path], list[str]]:
    """Draw ``kinds`` for each (model, task, settings) of ``aggregate``'s frame into ``out_dir``.

    Returns (written files, skipped notes): a kind is skipped when a figure it needs is missing from
    every row (e.g. no scores, or no peak memory).
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown figure kind(s) {', '.join(unknown)}; use {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = list(table.groupby(["model", "task", "settings"], sort=True))
    several_scopes, several_settings = len(table[["model", "task"]].drop_duplicates()) > 1, table["settings"].nunique() > 1
    written, skipped = [], []
    with rc_context(RC):
        for (model, task, settings), rows in groups:
            suffix = f"__{_slug(model)}__{_slug(task)}" if several_scopes else ""
            suffix += f"__{_slug(settings)}" if several_settings else ""
            for kind in kinds:
                missing = [c for c in NEEDS[kind] if rows[c].isna().all()]
                if missing:
                    skipped.append(f"{kind}{suffix}: no {', '.join(missing)} recorded")
                    continue
                fig = Figure()
                FigureCanvasAgg(fig)
                ax = fig.add_subplot()
                DRAW[kind](ax, rows)
                ax.set_title(f"{task} · {model}" + (f"\n{settings}" if settings else ""))
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
