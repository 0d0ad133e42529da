"""The report as a terminal table that fits: columns by priority, never a cut cell.

``tokbench.report.display_frame`` gives the formatted columns; this module only chooses which of them
to show for the console's width (grouping columns single-valued across rows move to the title).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokbench.cli import common as c

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

GROUPING = ("model", "method", "budget", "task", "run_id", "run_dir")
# Shown first to last while they fit; any other display column comes after these.
PRIORITY = ("n", "acc", "diff vs full [95% CI]", "ret.", "TTFT ms", "speedup", "rel. full", "FLOPs", "peak MB",
            "p50", "p90", "ret. in", "ret. final", "ret. layer")  # fmt: skip


def _width(shown: pd.DataFrame, column: str) -> int:
    """Characters the column takes in a SIMPLE_HEAD table: its widest cell, padding and a separator."""
    return max([len(column), *(len(v) for v in shown[column])]) + 3


def fit_report(table: pd.DataFrame, columns: list[str] | None, width: int) -> tuple[Table, list[str]]:
    """A rich table of ``table`` (``report.aggregate``'s frame) and the names of the columns left out.

    ``columns``: the headers to show in order (``["all"]``: every one); None: grouping columns, then
    ``PRIORITY`` order while the total fits ``width`` characters.
    """
    from rich import box
    from rich.table import Table

    from tokbench.report import display_frame

    shown = display_frame(table)
    constant = [col for col in shown.columns if col in GROUPING and col not in ("method", "budget")
                and shown[col].nunique() == 1]  # fmt: skip
    title = "tokbench report" + (": " + " · ".join(shown[col].iloc[0] for col in constant) if constant else "")
    shown = shown.drop(columns=constant)
    groups = [col for col in shown.columns if col in GROUPING]
    measures = [col for col in (*PRIORITY, *shown.columns) if col in shown.columns and col not in groups]
    measures = list(dict.fromkeys(measures))
    if columns == ["all"]:
        order, hidden = [*groups, *measures], []
    elif columns:
        unknown = [col for col in columns if col not in shown.columns]
        if unknown:
            c.fail(f"--columns: no column {unknown[0]!r}; use all or some of: {', '.join(shown.columns)}", 2)
        order, hidden = columns, []
    else:
        used = 1 + sum(_width(shown, col) for col in groups)
        order, hidden = list(groups), []
        for col in measures:
            if used + _width(shown, col) <= width or len(order) < len(groups) + 2:
                order.append(col)
                used += _width(shown, col)
            else:
                hidden.append(col)
    rendered = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD,
                     caption="acc and diff in points; CI: paired bootstrap, 95%")  # fmt: skip
    for col in order:
        rendered.add_column(col, justify="left" if col in GROUPING else "right", no_wrap=True)
    for row in shown[order].itertuples(index=False):
        rendered.add_row(*row)
    return rendered, hidden
