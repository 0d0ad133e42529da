"""Saved masks, `tokbench show RUN_DIR --doc-id` and the static HTML report, rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.models.base import Tile
from tokbench.show import tiles_view

LIMIT = 3
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")  # fmt: skip


def _run(out: Path, *args: str) -> Path:
    result = CliRunner().invoke(app, ["run", "--task", "vstar-synth", "--limit", str(LIMIT), "--batch-size", "3",
                                      "--save-masks", "--output", str(out), *args])  # fmt: skip
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("masked")
    return {
        "full": _run(root / "full", "--method", "full"),
        "random": _run(root / "random", "--method", "random", "--budget", "10"),
        "llava": _run(root / "llava", "--method", "random", "--budget", "10", "--model", "tiny-llava"),
    }


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _dimmed(view: Image.Image, reference: Image.Image, grid) -> int:
    rows, cols = grid
    a = np.asarray(view, dtype=np.float32).reshape(rows, view.height // rows, cols, view.width // cols, 3)
    b = np.asarray(reference, dtype=np.float32).reshape(rows, view.height // rows, cols, view.width // cols, 3)
    return int((a.mean(axis=(1, 3, 4)) < b.mean(axis=(1, 3, 4)) * 0.5).sum())


@pytest.mark.parametrize("name", ["full", "random", "llava"])
def test_saved_masks_record_the_grid_and_exactly_the_kept_tokens(runs, name):
    from tokbench.show import saved_overlay

    for row in _rows(runs[name]):
        ((tile,),) = row["token_tiles"]  # one image, one tile: [rows, cols, x0, y0, x1, y1]
        grid = tile[:2]
        assert grid[0] * grid[1] == row["n_visual"]
        kept = list(row["kept_index"].values())[-1] if row["kept_index"] else range(row["n_visual"])
        assert len(kept) == (row["n_visual"] if name == "full" else 10)
        image = Image.fromarray(np.full((row["image_sizes"][0][1], row["image_sizes"][0][0], 3), 200, np.uint8))
        view, n_kept, n = saved_overlay(image, row)
        assert (n_kept, n) == (len(kept), row["n_visual"])
        reference = tiles_view(image, [Tile.from_row(tile)], np.ones(n, dtype=bool))
        assert _dimmed(view, reference, grid) == n - n_kept


def test_show_draws_a_saved_document_from_several_runs(runs, tmp_path):
    out = tmp_path / "doc1.png"
    result = CliRunner().invoke(app, ["show", str(runs["full"]), str(runs["random"]), "--doc-id", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).width > 300 and out.with_suffix(".pdf").stat().st_size > 0
    missing = CliRunner().invoke(app, ["show", str(runs["full"]), "--doc-id", "99", "--out", str(out)])
    assert missing.exit_code == 2 and "no result for doc 99" in missing.output


def test_show_without_saved_masks_names_the_flag(tmp_path):
    result = CliRunner().invoke(app, ["run", "--task", "vstar-synth", "--limit", "1", "--method", "full",
                                      "--output", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    shown = CliRunner().invoke(app, ["show", str(run_dir), "--doc-id", "0", "--out", str(tmp_path / "x.png")])
    assert shown.exit_code == 2 and "--save-masks" in shown.output


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    result = CliRunner().invoke(app, ["html", *map(str, runs.values()), "--out", str(out), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    return out / "index.html"


def test_report_lists_every_run_and_sample_with_local_files_only(report, runs):
    page = report.read_text()
    body = page.split('id="report"', 1)[1].split("</table>", 1)[0]
    assert len(re.findall(r"<tr>", body.split("<tbody>", 1)[1])) == len(runs)  # one row per (model, method, budget)
    gallery = page.split('<table id="gallery"', 1)[1]
    assert gallery.count('<tr class="') == LIMIT * len(runs)
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and not [s for s in sources if "://" in s]  # nothing from a server or CDN
    assert all((report.parent / s).is_file() for s in sources)
    assert "http://" not in page and "https://" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt install chromium); .ci/run installs it")
def test_report_renders_in_headless_chromium_without_errors(report, runs, tmp_path):
    artifacts = Path(os.environ.get("TOKBENCH_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = report.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-ready="1"' in body and "data-errors" not in body  # the script ran; no uncaught error
    assert re.search(r'<span id="shown">(\d+)</span>', dom.stdout).group(1) == str(LIMIT * len(runs))
    shot = artifacts / "html_report.png"
    subprocess.run([*flags, "--window-size=1400,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert Image.open(shot).size == (1400, 1600)
