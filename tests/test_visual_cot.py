"""The Visual-CoT loader on the official layout, and the offline twin written in that layout."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tokbench.synth.visual_cot import generate_visual_cot_synth
from tokbench.tasks import TaskError, load_task
from tokbench.visual_cot import VisualCoTError, read_records

BOX = "Please provide the bounding box coordinate of the region that can help you answer the question better."


def _official(tmp_path, rel="cot/gqa/x/1.jpg"):
    (tmp_path / "viscot_benchmark" / "benchmark").mkdir(parents=True)
    record = {
        "dataset": "gqa", "split": "val", "question_id": 7,
        "image": [rel, f"{rel}###[10, 20, 30.6, 40]"],
        "conversations": [
            {"from": "human", "value": f"<image>\nWhat is on the table? {BOX}"},
            {"from": "gpt", "value": "[0.1, 0.2, 0.3, 0.4]"},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "A red cup."},
        ],
    }  # fmt: skip
    (tmp_path / "viscot_benchmark" / "benchmark" / "gqa.json").write_text(json.dumps([record]))
    return tmp_path


def test_official_record_becomes_query_reference_and_box(tmp_path):
    root = _official(tmp_path)
    (root / "cot" / "gqa" / "val" / "x").mkdir(parents=True)  # the official loader's val/ fallback
    Image.new("RGB", (8, 8)).save(root / "cot" / "gqa" / "val" / "x" / "1.jpg")
    (row,) = read_records(root, ["gqa"])
    assert row["question"] == "What is on the table?" and row["answer"] == "A red cup."
    assert row["bbox"] == [10, 20, 31, 40] and row["subset"] == "gqa" and row["question_id"] == "7"
    assert row["image"] == str(root / "cot" / "gqa" / "val" / "x" / "1.jpg")


@pytest.mark.parametrize("val", [False, True])
def test_glimpseprune_checkout_layout_loads(tmp_path, val):
    """GlimpsePrune: viscot_benchmark/benchmark/ beside datas/cot/<subset>/ (official: val/ after the subset)."""
    root = _official(tmp_path, rel="cot/gqa/2381.jpg")
    folder = root / "datas" / "cot" / "gqa" / ("val" if val else "")
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "2381.jpg")
    task = load_task("visual_cot_gqa", data_dir=str(root))
    doc = task.doc(0)
    assert doc.images[0].size == (40, 30) and doc.target == "A red cup."


def test_missing_subset_and_missing_benchmark_name_the_path(tmp_path):
    root = _official(tmp_path)
    with pytest.raises(VisualCoTError, match="subset 'vsr' has no file .*found: gqa"):
        read_records(root, ["vsr"])
    with pytest.raises(VisualCoTError, match="no Visual-CoT benchmark JSON files"):
        read_records(tmp_path / "cot", ["gqa"])


def test_task_over_local_copy_isolates_a_missing_image(tmp_path):
    task = load_task("visual_cot_gqa", data_dir=str(_official(tmp_path)))
    assert task.judged and len(task) == 1
    with pytest.raises(Exception, match="doc 0"):
        task.doc(0)
    with pytest.raises(TaskError, match="--data-dir"):
        load_task("visual_cot")


def test_synth_twin_is_deterministic_and_in_the_official_format(tmp_path):
    a, b = generate_visual_cot_synth(tmp_path / "a", n=3), generate_visual_cot_synth(tmp_path / "b", n=3)
    for subset in ("shapes", "words"):
        assert (a / "benchmark" / f"{subset}.json").read_text() == (b / "benchmark" / f"{subset}.json").read_text()
        rows = read_records(a, [subset])
        assert len(rows) == 3 and all(BOX not in r["question"] and "<image>" not in r["question"] for r in rows)
        for row in rows:
            x1, y1, x2, y2 = row["bbox"]
            assert 0 <= x1 < x2 <= 448 and 0 <= y1 < y2 <= 448
            assert Image.open(row["image"]).size == (448, 448)
    assert (a / "images" / "words" / "000000.png").read_bytes() == (b / "images" / "words" / "000000.png").read_bytes()
