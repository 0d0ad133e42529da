"""Visual-CoT free-form benchmark: read the official layout into one table lmms-eval can load.

Official layout (Visual-CoT's ``viscot_benchmark``, used as is by GlimpsePrune): ``benchmark/<subset>.json``
(a JSON list) whose records have ``question_id``, ``image`` = ``[path, "path###[x1, y1, x2, y2]"]``
(pixel box) and ``conversations`` = [question + box request, normalised box, "<image>", answer]. Images
live under an image root, addressed by ``image[0]``. The query is the first turn without ``<image>\\n``
and without the box request; the reference answer is the last turn (GlimpsePrune
``viscot_eval/infer_cot.py``).

``build_table(data_dir, subsets)`` writes ``test.parquet`` (columns ``question_id``, ``subset``,
``question``, ``answer``, ``bbox``, ``image`` = the image file's path, opened per document) into the
data cache and returns its path; the lmms-eval tasks in ``tasks/visual_cot*`` read it. ``data_dir`` may hold
``benchmark/`` or ``viscot_benchmark/benchmark/`` or the JSON files directly; GlimpsePrune's checkout
(``viscot_benchmark/benchmark/`` beside ``datas/cot/<subset>/``) is such a directory. Images are looked
up under ``data_dir``, ``data_dir/datas`` and ``data_dir/images`` (``_image_path``).
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

SUBSETS = (
    "cub", "docvqa", "dude", "flickr30k", "gqa", "infographicsvqa",
    "openimages", "sroie", "textcap", "textvqa", "visual7w", "vsr",
)  # fmt: skip  (GlimpsePrune's 12; Visual-CoT also has emotic)
_TABLE_VERSION = 2  # bump when build_table's columns change: cached tables are rebuilt
BOX_SENTENCE = "Please provide the bounding box coordinate of the region that can help you answer the question better."


class VisualCoTError(ValueError):
    """The benchmark files cannot be found or read (one line naming the path)."""


def benchmark_dir(data_dir: Path) -> Path:
    """The directory holding ``<subset>.json`` under ``data_dir``."""
    data_dir = Path(data_dir).expanduser()
    for candidate in (data_dir / "benchmark", data_dir / "viscot_benchmark" / "benchmark", data_dir):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    raise VisualCoTError(
        f"no Visual-CoT benchmark JSON files under {data_dir} (expected benchmark/<subset>.json); "
        "pass --data-dir with the viscot_benchmark folder and its images"
    )


def read_records(data_dir: Path, subsets: list[str]) -> list[dict]:
    """Rows (question_id, subset, question, answer, bbox, image path) of ``subsets``, in order."""
    bench = benchmark_dir(data_dir)
    rows = []
    for subset in subsets:
        path = bench / f"{subset}.json"
        if not path.is_file():
            have = ", ".join(sorted(p.stem for p in bench.glob("*.json")))
            raise VisualCoTError(f"Visual-CoT subset {subset!r} has no file {path} (found: {have})")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise VisualCoTError(f"{path} is not valid JSON ({err})") from None
        for record in records:
            rows.append(_row(record, subset, Path(data_dir).expanduser()))
    return rows


def _row(record: dict, subset: str, root: Path) -> dict:
    turns = record["conversations"]
    question = turns[0]["value"].replace(BOX_SENTENCE, "").strip().replace("<image>\n", "")
    image = record["image"]
    rel, box = (image[0], image[1]) if isinstance(image, list) else (image, "")
    bbox = [int(round(float(v))) for v in ast.literal_eval(box.split("###")[1])] if "###" in box else None
    return {
        "question_id": str(record.get("question_id")),
        "subset": subset,
        "question": question,
        "answer": turns[-1]["value"],
        "bbox": bbox,
        "image": str(_image_path(root, rel)),
    }


def _image_path(root: Path, rel: str) -> Path:
    """The image file for ``rel`` (``image[0]``, e.g. ``cot/flickr30k/x.jpg``) under ``root``,
    ``root/datas`` (GlimpsePrune's image folder) or ``root/images``; in each, also with ``val/`` after
    the subset folder (``cot/flickr30k/val/x.jpg``), the official loader's fallback. The first candidate
    when none exists (the doc then fails to load, naming it)."""
    parts = Path(rel).parts
    candidates = []
    for base in (root, root / "datas", root / "images"):
        candidates.append(base / rel)
        if len(parts) >= 3:
            candidates.append(base.joinpath(*parts[:2], "val", *parts[2:]))
    return next((c for c in candidates if c.is_file()), candidates[0])


def build_table(data_dir: Path, subsets: list[str]) -> Path:
    """Write the rows of ``subsets`` to a cached ``test.parquet`` (rebuilt when the JSON files change)."""
    import datasets

    from tokbench.synth import data_root, quiet_datasets

    bench = benchmark_dir(data_dir)
    stamp = [_TABLE_VERSION, str(bench.resolve()), list(subsets)]
    stamp += [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(bench.glob("*.json"))]
    digest = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    out = data_root() / "visual-cot-tables" / digest / "test.parquet"
    if out.is_file():
        return out
    rows = read_records(data_dir, subsets)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "subset": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "bbox": datasets.List(datasets.Value("int32")),
            "image": datasets.Value("string"),
        }
    )
    table = {name: [r[name] for r in rows] for name in features}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with quiet_datasets():
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp))
    tmp.replace(out)
    return out


def subsets_for(task_name: str) -> list[str]:
    """Subsets a task name covers: ``visual_cot`` → all 12, ``visual_cot_gqa`` → [gqa], synth likewise."""
    from tokbench.synth.visual_cot import SUBSETS as SYNTH_SUBSETS

    if task_name == "visual_cot":
        return list(SUBSETS)
    if task_name == "visual_cot_synth":
        return list(SYNTH_SUBSETS)
    subset = task_name.removeprefix("visual_cot_synth_").removeprefix("visual_cot_")
    return [subset]
