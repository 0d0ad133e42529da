"""tokbench/plots.py: every figure kind as non-empty PNG + PDF, stable method looks, Pareto front."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image
from test_report import write_runs
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.plots import KINDS, STYLES, method_style, pareto_front, plot


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return write_runs(tmp_path_factory.mktemp("runs"))


def test_every_kind_writes_png_and_pdf(runs, tmp_path):
    written, skipped = plot([runs], tmp_path)
    assert not skipped
    assert sorted(p.name for p in written) == sorted(f"{k}.{ext}" for k in KINDS for ext in ("png", "pdf"))
    for path in written:
        assert path.stat().st_size > 1000, path
        if path.suffix == ".pdf":
            assert path.read_bytes().startswith(b"%PDF")
    with Image.open(tmp_path / "accuracy_retention.png") as image:
        width, height = image.size
        assert image.format == "PNG"
    # 4 x 3 in at 200 dpi, trimmed by bbox_inches="tight", plus the legend beside the axes
    assert 700 <= width <= 1400 and 450 <= height <= 800


def test_method_looks_are_fixed_or_stably_hashed():
    assert method_style("full") == STYLES["full"] and method_style("fastv") == STYLES["fastv"]
    assert method_style("my-new-method") == method_style("my-new-method")
    colour, marker = method_style("my-new-method")
    assert colour.startswith("#") and marker
    assert len({method_style(m)[0] for m in STYLES}) == len(STYLES)  # known methods never share a colour


def test_pareto_front():
    points = pd.DataFrame({"ttft_ms": [10, 20, 15, 30, 25], "accuracy": [0.5, 0.7, 0.4, 0.8, 0.6]})
    front = pareto_front(points)
    assert front.values.tolist() == [[10, 0.5], [20, 0.7], [30, 0.8]]


def test_several_tasks_get_one_figure_set_each(tmp_path):
    write_runs(tmp_path / "runs", task="task-a")
    write_runs(tmp_path / "runs", task="task-b")
    written, _ = plot([tmp_path / "runs"], tmp_path / "fig", kinds=["pareto"], formats=["png"])
    assert sorted(p.name for p in written) == ["pareto__tiny-qwen2.5-vl__task-a.png", "pareto__tiny-qwen2.5-vl__task-b.png"]


def test_cli_plot(runs, tmp_path):
    cli = CliRunner()
    result = cli.invoke(app, ["plot", str(runs), "--out", str(tmp_path), "--kinds", "memory", "--formats", "pdf"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "memory.pdf").stat().st_size > 0
    result = cli.invoke(app, ["plot", str(runs), "--out", str(tmp_path), "--kinds", "pie"])
    assert result.exit_code == 2 and "unknown figure kind" in result.output


def _drawn(kind, runs, tmp_path):
    """The axes of one figure kind, drawn as plot_table draws it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tokbench.plots import DRAW
    from tokbench.report import report

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    DRAW[kind](ax, report([runs]))
    fig.canvas.draw()
    return ax


def test_pareto_labels_never_overlap_and_the_front_has_a_line(tmp_path):
    scores = {("full", 1.0): [1] * 8, **{(m, r): [1, 0] * 4 for m in ("random", "pool", "fastv", "vscan") for r in (0.1, 0.25, 0.5)}}
    runs = write_runs(tmp_path / "runs", scores)  # every method at one TTFT per budget: the crowded case
    ax = _drawn("pareto", runs, tmp_path)
    renderer = ax.figure.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    assert len(boxes) >= 6 and {t.get_text() for t in ax.texts} <= {"r0.1", "r0.25", "r0.5"}
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert all(t.arrow_patch is not None for t in ax.texts)  # a leader line to its point
    handles, labels = ax.get_legend_handles_labels()
    front = handles[labels.index("Pareto front")]
    assert front.get_linestyle() not in ("None", "", " ") and front.get_linewidth() > 0
    assert "per sample, batch/b" in ax.get_xlabel()


def test_memory_bars_are_labelled_one_row_each(runs, tmp_path):
    ax = _drawn("memory", runs, tmp_path)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["full", "pool  r0.25", "random  r0.25", "random  r0.5"]
    renderer = ax.figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_runs_with_different_settings_get_separate_figures(tmp_path):
    write_runs(tmp_path / "runs" / "b1", settings={"batch_size": 1})
    write_runs(tmp_path / "runs" / "b4", settings={"batch_size": 4}, seed=1)
    written, _ = plot([tmp_path / "runs"], tmp_path / "fig", kinds=["ttft_retention"], formats=["png"])
    assert sorted(p.name for p in written) == ["ttft_retention__batch_size=1.png", "ttft_retention__batch_size=4.png"]
