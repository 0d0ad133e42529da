"""The vstar-synth generator and the task layer over lmms-eval (tokbench/synth, tokbench/tasks.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokbench.synth import ensure_vstar_synth, generate_vstar_synth
from tokbench.synth.vstar import COLORS
from tokbench.tasks import DocError, TaskError, load_task, task_names

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "test.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return generate_vstar_synth(tmp_path_factory.mktemp("vstar") / "data", n=16, seed=0)


@pytest.fixture(scope="module")
def synth_task(synth_dir):
    return load_task("vstar-synth", data_dir=str(synth_dir))


# --- generator ---------------------------------------------------------------------------------------


def test_generator_is_deterministic(tmp_path):
    a = generate_vstar_synth(tmp_path / "a", n=12, seed=3)
    b = generate_vstar_synth(tmp_path / "b", n=12, seed=3)
    c = generate_vstar_synth(tmp_path / "c", n=12, seed=4)
    assert _rows(a) == _rows(b)
    images = sorted(p.name for p in (a / "images").iterdir())
    assert len(images) == 12
    assert all((a / "images" / f).read_bytes() == (b / "images" / f).read_bytes() for f in images)
    assert (a / "test.parquet").read_bytes() == (b / "test.parquet").read_bytes()
    assert _rows(a) != _rows(c)
    assert (a / "images" / images[0]).read_bytes() != (c / "images" / images[0]).read_bytes()


def test_generator_balances_categories_letters_and_sizes(tmp_path):
    rows = _rows(generate_vstar_synth(tmp_path, n=40, seed=1))
    assert Counter(r["category"] for r in rows) == {"direct_attributes": 24, "relative_position": 16}
    direct = Counter(r["label"] for r in rows if r["category"] == "direct_attributes")
    relative = Counter(r["label"] for r in rows if r["category"] == "relative_position")
    assert direct == {"A": 6, "B": 6, "C": 6, "D": 6}
    assert relative == {"A": 8, "B": 8}
    sizes = {(r["width"], r["height"]) for r in rows}
    assert any(w != h for w, h in sizes), sizes
    assert all(w % 28 == 0 and h % 28 == 0 for w, h in sizes)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["n"] == 40 and info["labels"] == {"A": 14, "B": 14, "C": 6, "D": 6}


def test_boxes_hold_the_target_colour_and_match_the_answer(tmp_path):
    out = generate_vstar_synth(tmp_path, n=24, seed=2)
    for row in _rows(out):
        image = np.asarray(Image.open(out / row["image"]).convert("RGB"))
        assert image.shape[:2] == (row["height"], row["width"])
        assert row["bbox"] == row["bboxes"][0]
        for (x1, y1, x2, y2), colour in zip(row["bboxes"], row["colors"]):
            assert 0 <= x1 < x2 <= row["width"] and 0 <= y1 < y2 <= row["height"]
            assert x2 - x1 == 32  # 1/14 of 448
            assert (image[y1:y2, x1:x2] == COLORS[colour]).all()
        options = row["text"].split("\n")[1:]
        answer = options["ABCD".index(row["label"])].split(" ", 1)[1]
        if row["category"] == "direct_attributes":
            assert answer == row["colors"][0]
            assert "(A) red" in row["text"] and "(D) yellow" in row["text"]
        else:
            (ax, ay, *_), (bx, by, *_) = row["bboxes"]
            expected = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}
            assert expected[answer], row


def test_ensure_generates_once_and_replaces_stale_or_partial_data(tmp_path):
    first = ensure_vstar_synth(n=8, seed=0, root=tmp_path)
    assert first == tmp_path / "vstar-synth-0-8"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(first.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    stamp = (first / "test.parquet").stat().st_mtime_ns
    assert ensure_vstar_synth(n=8, seed=0, root=tmp_path) == first
    assert (first / "test.parquet").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vstar-synth-0-8"]  # no temp dirs left

    info = json.loads((first / "info.json").read_text())
    (first / "info.json").write_text(json.dumps({**info, "version": "0"}))  # an older generator
    assert ensure_vstar_synth(n=8, seed=0, root=tmp_path) == first
    assert json.loads((first / "info.json").read_text())["version"] == info["version"]

    (first / "info.json").unlink()  # an interrupted copy is never used
    ensure_vstar_synth(n=8, seed=0, root=tmp_path)
    assert (first / "info.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vstar-synth-0-8"]


@pytest.mark.slow
def test_generating_200_items_is_fast(tmp_path):
    start = time.perf_counter()
    generate_vstar_synth(tmp_path, n=200)
    assert time.perf_counter() - start < 10


# --- task layer --------------------------------------------------------------------------------------


def test_vstar_synth_docs_use_lmms_eval_prompts(synth_task, synth_dir):
    assert synth_task.name == "vstar_synth" and synth_task.version == "1.0"
    assert len(synth_task) == 16 and synth_task.doc_ids() == list(range(16))
    assert synth_task.gen_kwargs["max_new_tokens"] == 16 and synth_task.gen_kwargs["do_sample"] is False
    rows = _rows(synth_dir)
    for doc_id in (0, 5):
        doc = synth_task.doc(doc_id)
        row = rows[doc_id]
        assert doc.prompt.endswith(POST_PROMPT)
        if row["category"] == "direct_attributes":  # lmms-eval rewrites "(A) red" as "A. red"
            assert doc.prompt.startswith("What is the color of the small square?\nA. red\nB. green\nC. blue\nD. yellow")
        assert doc.target == row["label"]
        assert len(doc.images) == 1 and doc.images[0].mode == "RGB"
        assert doc.images[0].size == (row["width"], row["height"])
        assert doc.meta["bbox"] == row["bbox"] and doc.meta["category"] == row["category"]
        assert doc.meta["question_id"] == doc_id


def test_scores_go_through_lmms_eval_process_results(synth_task):
    doc = synth_task.doc(2)
    wrong = next(letter for letter in "ABCD" if letter != doc.target)
    assert synth_task.score(2, doc.target)["score"] == 1.0
    assert synth_task.score(2, f"The answer is ({doc.target}).")["score"] == 1.0
    scored = synth_task.score(2, wrong)
    assert scored["score"] == 0.0 and scored["vstar_overall_acc"] == 0.0
    assert synth_task.score(2, "")["score"] == 0.0


def test_limit_and_bad_doc_ids(synth_dir):
    task = load_task("vstar_synth", data_dir=str(synth_dir), limit=5)
    assert len(task) == 5 and task.doc_ids() == [0, 1, 2, 3, 4]
    with pytest.raises(DocError, match="no doc 5"):
        task.doc(5)


def test_default_vstar_synth_is_generated_into_the_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKBENCH_DATA", str(tmp_path))
    task = load_task("vstar-synth", limit=3)
    assert Path(task.data) == tmp_path / "vstar-synth-0-200"
    assert len(task.lmms_task.eval_docs) == 200 and len(task) == 3
    assert task.doc(0).prompt.endswith(POST_PROMPT)


def test_corrupt_image_fails_only_when_its_doc_is_loaded(tmp_path):
    import datasets

    out = generate_vstar_synth(tmp_path / "data", n=6, seed=0)
    table = datasets.Dataset.from_parquet(str(out / "test.parquet"), cache_dir=str(tmp_path / "cache"))
    table = table.cast_column("image", datasets.Image(decode=False))
    table = table.map(
        lambda row, i: {"image": {"bytes": b"not a png" if i == 4 else row["image"]["bytes"], "path": row["image"]["path"]}},
        with_indices=True,
    )
    table.cast_column("image", datasets.Image()).to_parquet(str(out / "test.parquet"))
    task = load_task("vstar-synth", data_dir=str(out))
    assert task.doc(3).images
    with pytest.raises(DocError, match=r"doc 4 \(image images/000004.png in .*data\)"):
        task.doc(4)


def test_unknown_task_lists_close_matches():
    with pytest.raises(TaskError, match=r"unknown task 'vstr'; did you mean vstar, vstar_synth") as err:
        load_task("vstr")
    assert "\n" not in str(err.value)


def test_multi_task_group_is_refused():
    with pytest.raises(TaskError, match=r"mmbench is an lmms-eval group of \d+ tasks \(mmbench_en_dev"):
        load_task("mmbench")


@pytest.mark.parametrize("name", ["vstar", "vstar_bench"])
def test_hub_task_offline_names_its_dataset(monkeypatch, tmp_path, name):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(TaskError, match="task vstar_bench needs dataset lmms-lab-encoder/vstar-bench, which is not in") as err:
        load_task(name)
    assert time.perf_counter() - start < 15  # no retry loop
    assert "hf download --repo-type dataset lmms-lab-encoder/vstar-bench --local-dir DIR) and pass --data-dir DIR" in str(err.value)


def test_hub_task_reads_a_local_copy(synth_dir, synth_task, tmp_path):
    """lmms-eval's own vstar_bench on a local copy (save_to_disk dir or one parquet file)."""
    import datasets

    table = datasets.Dataset.from_parquet(str(synth_dir / "test.parquet"), cache_dir=str(tmp_path / "cache"))
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "snapshot" / "data").mkdir(parents=True)  # the hub repo layout
    table.to_parquet(str(tmp_path / "snapshot" / "data" / "test-00000-of-00001.parquet"))
    for data_dir in (tmp_path / "saved", synth_dir / "test.parquet", tmp_path / "snapshot"):
        task = load_task("vstar", data_dir=str(data_dir), limit=4)
        assert task.name == "vstar_bench" and len(task) == 4
        doc = task.doc(1)
        assert doc.prompt == synth_task.doc(1).prompt
        assert task.score(1, doc.target)["score"] == 1.0


def test_missing_data_dir_is_a_task_error(tmp_path):
    with pytest.raises(TaskError, match="no test.parquet"):
        load_task("vstar-synth", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(TaskError, match="does not exist"):
        load_task("vstar", data_dir=str(tmp_path / "nowhere"))


def test_task_names_is_cheap():
    names = task_names()
    assert {"vstar_synth", "visual_cot", "visual_cot_gqa", "visual_cot_synth"} <= set(names)
    assert any(line.startswith("vstar = vstar_bench") for line in task_names())
    code = (
        "import sys; from tokbench.tasks import task_names; task_names(); "
        "heavy = [m for m in ('lmms_eval', 'torch', 'datasets', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scoring_lmms_evals_vstar_prints_no_debug_lines(synth_dir, capfd):
    """vstar_bench's process_results logs every answer at DEBUG from a module lmms-eval names `utils`."""
    task = load_task("vstar", data_dir=str(synth_dir / "test.parquet"), limit=2)
    capfd.readouterr()
    task.score(0, "A")
    out, err = capfd.readouterr()
    assert "DEBUG" not in out + err and "Predicted" not in out + err


def test_vstar_parquet_without_hf_metadata_loads(synth_dir, synth_task, tmp_path):
    """A parquet written by pandas/pyarrow: the image column reads back as {bytes, path} dicts."""
    import pyarrow.parquet as pq

    table = pq.read_table(synth_dir / "test.parquet").replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "plain.parquet")
    task = load_task("vstar", data_dir=str(tmp_path / "plain.parquet"), limit=3)
    doc = task.doc(1)
    expected = synth_task.doc(1)
    assert doc.images[0].size == expected.images[0].size and doc.prompt == expected.prompt
    assert np.array_equal(np.asarray(doc.images[0]), np.asarray(expected.images[0]))
    assert task.score(1, doc.target)["score"] == 1.0


def test_hub_cache_snapshot_loads_offline(monkeypatch, tmp_path, synth_dir, synth_task):
    """`hf download --repo-type dataset lmms-lab-encoder/vstar-bench` filled the hub cache; offline,
    `datasets` cannot use it, so tokbench reads the snapshot as a local copy."""
    repo = tmp_path / "hub" / "datasets--lmms-lab-encoder--vstar-bench"
    (repo / "snapshots" / "abc123" / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "data" / "test-00000-of-00001.parquet").write_bytes((synth_dir / "test.parquet").read_bytes())
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    task = load_task("vstar", limit=2)
    assert Path(task.data) == repo / "snapshots" / "abc123"
    assert task.doc(1).prompt == synth_task.doc(1).prompt
