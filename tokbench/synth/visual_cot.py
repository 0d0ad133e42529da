"""`visual-cot-synth`: a small offline benchmark in the Visual-CoT format, generated from a seed.

The layout is the official one (``viscot_benchmark/benchmark/<subset>.json``, a JSON list per subset),
so the same loader (``tokbench.visual_cot``) reads it and the real benchmark::

    benchmark/shapes.json, benchmark/words.json
    images/<subset>/000000.png ...
    info.json

Subsets: ``shapes`` ("What is the color of the small square?" → "The small square is red.") and
``words`` ("What word is written on the white label?" → the word). Each record carries the pixel box of
the region that answers the question, as Visual-CoT does (``image[1]`` = ``"path###[x1, y1, x2, y2]"``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import ImageDraw, ImageFont

from tokbench.synth.vstar import COLORS, _draw, _png_bytes, _random_box, _square_side

GENERATOR_VERSION = "1"
SUBSETS = ("shapes", "words")
BOX_SENTENCE = "Please provide the bounding box coordinate of the region that can help you answer the question better."
_WORDS = (
    "apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "ocean", "maple", "ember",
    "quartz", "violet", "harbor", "canyon", "meadow", "falcon", "copper", "saddle", "timber", "glacier",
)  # fmt: skip


def generate_visual_cot_synth(out_dir: Path, n: int = 20, seed: int = 0, size: tuple[int, int] = (448, 448)) -> Path:
    """Write ``n`` records per subset into ``out_dir`` (deterministic for ``(n, seed, size)``); returns it."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "benchmark").mkdir(parents=True, exist_ok=True)
    width, height = size
    for s, subset in enumerate(SUBSETS):
        (out_dir / "images" / subset).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            rng = np.random.default_rng([seed, s, i])
            image, box, question, answer = (_shapes_item if subset == "shapes" else _words_item)(rng, width, height)
            rel = f"images/{subset}/{i:06d}.png"
            (out_dir / rel).write_bytes(_png_bytes(image))
            records.append(_record(subset, i, rel, box, width, height, question, answer))
        (out_dir / "benchmark" / f"{subset}.json").write_text(json.dumps(records, indent=1) + "\n")
    info = {"generator": "tokbench.synth.visual_cot", "version": GENERATOR_VERSION, "n": n, "seed": seed, "size": list(size)}
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def ensure_visual_cot_synth(n: int = 20, seed: int = 0, root: Path | None = None) -> Path:
    """Generate once into ``root`` (default ``data_root()``) / ``visual-cot-synth-<seed>-<n>`` and reuse it."""
    from tokbench.synth import data_root

    root = Path(root) if root is not None else data_root()
    final = root / f"visual-cot-synth-{seed}-{n}"
    if _is_current(final, n, seed):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        generate_visual_cot_synth(tmp, n=n, seed=seed)
        if not _is_current(final, n, seed):
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    except OSError:
        if not _is_current(final, n, seed):  # a concurrent caller did not win either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_current(path: Path, n: int, seed: int) -> bool:
    try:
        info = json.loads((path / "info.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == GENERATOR_VERSION and info.get("n") == n and info.get("seed") == seed


def _record(subset: str, index: int, rel: str, box: list[int], width: int, height: int, question: str, answer: str) -> dict:
    """One record in the official schema (the normalised box is the model's first-turn target there)."""
    normed = [round(box[0] / width, 3), round(box[1] / height, 3), round(box[2] / width, 3), round(box[3] / height, 3)]
    return {
        "dataset": subset,
        "split": "test",
        "question_id": index,
        "image": [rel, f"{rel}###{box}"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{question} {BOX_SENTENCE}"},
            {"from": "gpt", "value": str(normed)},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": answer},
        ],
    }


def _shapes_item(rng: np.random.Generator, width: int, height: int):
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    box = _random_box(rng, width, height, _square_side(width, height))
    image = _draw(rng, width, height, [(box, color)])
    return image, box, "What is the color of the small square?", f"The small square is {color}."


def _words_item(rng: np.random.Generator, width: int, height: int):
    word = _WORDS[int(rng.integers(len(_WORDS)))]
    font = ImageFont.load_default(size=18)
    image = _draw(rng, width, height, [])
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left + 12, bottom - top + 10
    x, y = int(rng.integers(4, width - w - 4)), int(rng.integers(4, height - h - 4))
    box = [x, y, x + w, y + h]
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(255, 255, 255), outline=(30, 30, 30))
    draw.text((x + 6 - left, y + 5 - top), word, fill=(10, 10, 10), font=font)
    return image, box, "What word is written on the white label?", word
