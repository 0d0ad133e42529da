"""`vstar-synth`: an offline V*-like "find the small object" task, generated deterministically from a seed.

Each item is a light-grey textured image with muted distractor shapes and small saturated squares
(side ≈ 1/14 of the longer image side: 32 px on 448) in red, green, blue or yellow:

- ``direct_attributes``: one square; "What is the color of the small square?" with the four colours as
  options in a fixed order, so the letter is balanced exactly when the colours are;
- ``relative_position``: two squares of different colours; "Is the red square on the left or right side
  of the blue square?" (or above / below), two options.

The schema is lmms-eval's ``vstar_bench`` (``image``, ``text`` with inline "(A) ... (D) ..." options and
no post-prompt, ``label``, ``category``, ``question_id``) plus the boxes a pruner can be trained or
checked on: ``bbox`` [x1, y1, x2, y2] (pixels, exclusive end) of the square the question is about,
``bboxes`` and ``colors`` of every coloured square (the first is ``bbox``).

Layout of a generated directory::

    images/000000.png ...    the images
    test.parquet             the table (images embedded as PNG bytes, so the folder can be moved)
    test.jsonl               the same rows with the image's relative path instead of its bytes
    info.json                generator version, n, seed, image size, category and letter counts
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "1"
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
LETTERS = "ABCD"
RELATIVE_SHARE = 0.4  # V* has 76 of 191 relative-position questions
_PATCH = 28  # image sides stay multiples of the Qwen2.5-VL merge unit (2 x 14 px)
# The generated tasks: the small canary task for accuracy, and a V*-sized sibling for efficiency runs.
# Real V* images average ~2246x1582 px; at GlimpsePrune's max_pixels 3211264 Qwen2.5-VL resizes each of
# these (2464x1736, 2464x1288, 1848x1736) to 4048-4092 visual tokens.
VARIANTS: dict[str, dict] = {
    "vstar_synth": {"n": 200, "image_size": (448, 448)},
    "vstar_synth_hires": {"n": 24, "image_size": (2464, 1736)},
}


def generate_vstar_synth(
    out_dir: Path, n: int = 200, seed: int = 0, image_size: tuple[int, int] = (448, 448)
) -> Path:
    """Write ``n`` items into ``out_dir`` (created; must not hold a previous generation); returns it.

    Deterministic: the same ``(n, seed, image_size)`` gives byte-identical images and rows.
    ``image_size`` is (width, height) of the base size; each image is that size, 3/4 as high or 3/4 as
    wide, drawn at random (448x448, 448x336, 336x448 by default), all sides rounded to multiples of 28.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_rel = int(round(n * RELATIVE_SHARE)) if n >= 4 else 0
    categories = np.array(["direct_attributes"] * (n - n_rel) + ["relative_position"] * n_rel)
    rng.shuffle(categories)
    direct_answers = _balanced(rng, int((categories == "direct_attributes").sum()), 4)
    relative_answers = _balanced(rng, n_rel, 2)
    sizes = _image_sizes(image_size)
    rows = []
    for i, category in enumerate(categories):
        item_rng = np.random.default_rng([seed, i])
        width, height = sizes[int(item_rng.integers(len(sizes)))]
        answers = direct_answers if category == "direct_attributes" else relative_answers
        row, image = draw_item(item_rng, category, int(answers.pop()), width, height)
        png = _png_bytes(image)
        rel_path = f"images/{i:06d}.png"
        (out_dir / rel_path).write_bytes(png)
        rows.append({"question_id": i, **row, "image_path": rel_path, "width": width, "height": height, "png": png})
    _write_tables(out_dir, rows)
    info = {
        "generator": "tokbench.synth.vstar",
        "version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "image_size": list(image_size),
        "categories": {c: int((categories == c).sum()) for c in ("direct_attributes", "relative_position")},
        "labels": {k: sum(r["label"] == k for r in rows) for k in LETTERS},
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def ensure_vstar_synth(
    n: int = 200, seed: int = 0, image_size: tuple[int, int] = (448, 448), root: Path | None = None
) -> Path:
    """Generate once into ``root`` (default ``data_root()``) / ``vstar-synth-<seed>-<n>`` and reuse it.

    Generation goes to a temporary sibling directory renamed into place when complete, so an
    interrupted run never leaves a half-written dataset; a directory from another generator version is
    replaced. Concurrent callers race safely: the first rename wins, the others reuse its result.
    """
    if root is None:
        from tokbench.synth import data_root

        root = data_root()
    root = Path(root)
    name = f"vstar-synth-{seed}-{n}"
    if tuple(image_size) != (448, 448):
        name += f"-{image_size[0]}x{image_size[1]}"
    final = root / name
    if _is_current(final, n, seed, image_size):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache may be shared
    try:
        generate_vstar_synth(tmp, n=n, seed=seed, image_size=image_size)
        if _is_current(final, n, seed, image_size):  # a concurrent caller finished first
            return final
        if final.exists():  # stale version or partial copy: move aside, then replace
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale.", dir=root))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        if not _is_current(final, n, seed, image_size):  # a concurrent caller did not win either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_current(path: Path, n: int, seed: int, image_size: tuple[int, int]) -> bool:
    try:
        info = json.loads((path / "info.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "image_size": list(image_size)}
    return all(info.get(k) == v for k, v in expected.items()) and (path / "test.parquet").is_file()


def _balanced(rng: np.random.Generator, count: int, k: int) -> list[int]:
    """``count`` answers in 0..k-1, each appearing floor or ceil of count/k times, shuffled."""
    answers = np.tile(np.arange(k), -(-count // k))[:count] if count else np.zeros(0, dtype=int)
    rng.shuffle(answers)
    return answers.tolist()


def _image_sizes(image_size: tuple[int, int]) -> list[tuple[int, int]]:
    width, height = (max(_PATCH, int(round(s / _PATCH)) * _PATCH) for s in image_size)
    def short(side: int) -> int:
        return max(_PATCH, int(round(side * 0.75 / _PATCH)) * _PATCH)

    return [(width, height), (width, short(height)), (short(width), height)]


def _square_side(width: int, height: int) -> int:
    return max(8, int(round(max(width, height) / 14)))


def draw_item(
    rng: np.random.Generator, category: str, answer: int, width: int, height: int, side: int | None = None
) -> tuple[dict, Image.Image]:
    """One item (row without ids, image) of ``category`` with option index ``answer``; ``side`` overrides
    the square size (the canary's training curriculum starts with large squares)."""
    make = _direct_item if category == "direct_attributes" else _relative_item
    row, squares = make(rng, width, height, answer, side)
    return row, _draw(rng, width, height, squares, side)


def _direct_item(rng, width, height, answer: int, side: int | None = None):
    side = side or _square_side(width, height)
    color = list(COLORS)[answer]
    box = _random_box(rng, width, height, side)
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(COLORS))
    row = {
        "text": f"What is the color of the small square?\n{options}",
        "label": LETTERS[answer],
        "category": "direct_attributes",
        "bbox": box,
        "bboxes": [box],
        "colors": [color],
    }
    return row, [(box, color)]


def _relative_item(rng, width, height, answer: int, side: int | None = None):
    """answer 0 = (A) left / above, 1 = (B) right / below, for the first square relative to the second."""
    side = side or _square_side(width, height)
    horizontal = bool(rng.integers(2))
    first, second = (list(COLORS)[i] for i in rng.choice(4, size=2, replace=False))
    axis = 0 if horizontal else 1
    extent = (width, height)[axis]
    gap = 3 * side  # centres at least 3 sides apart along the asked axis
    lo = int(rng.integers(4, extent - side - gap - 4 + 1))
    hi = int(rng.integers(lo + gap, extent - side - 4 + 1))
    a_pos, b_pos = (lo, hi) if answer == 0 else (hi, lo)
    box_a = _random_box(rng, width, height, side, **{"x" if horizontal else "y": a_pos})
    box_b = _random_box(rng, width, height, side, **{"x" if horizontal else "y": b_pos})
    words = ("left", "right") if horizontal else ("above", "below")
    question = (
        f"Is the {first} square on the left or right side of the {second} square?"
        if horizontal
        else f"Is the {first} square above or below the {second} square?"
    )
    row = {
        "text": f"{question}\n(A) {words[0]}\n(B) {words[1]}",
        "label": LETTERS[answer],
        "category": "relative_position",
        "bbox": box_a,
        "bboxes": [box_a, box_b],
        "colors": [first, second],
    }
    return row, [(box_a, first), (box_b, second)]


def _random_box(rng, width, height, side, x: int | None = None, y: int | None = None) -> list[int]:
    x = int(rng.integers(4, width - side - 4 + 1)) if x is None else x
    y = int(rng.integers(4, height - side - 4 + 1)) if y is None else y
    return [x, y, x + side, y + side]


def _overlaps(a, b, margin: int) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _draw(rng, width, height, squares, side: int | None = None) -> Image.Image:
    """Textured grey background, muted distractors away from the squares, then the solid squares."""
    base = rng.uniform(185, 225)
    coarse = rng.standard_normal((height // 56 + 2, width // 56 + 2)).astype(np.float32) * 9
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    grain = rng.integers(-4, 5, size=(height // 2 + 1, width // 2 + 1)).astype(np.float32)
    grain = grain.repeat(2, axis=0).repeat(2, axis=1)[:height, :width]  # 2x2-pixel grain
    grey = np.clip(base + texture + grain, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    draw = ImageDraw.Draw(image)
    keep_clear = [box for box, _ in squares]
    side = side or _square_side(width, height)
    for _ in range(int(rng.integers(6, 13))):
        for _attempt in range(20):
            w, h = (int(v) for v in rng.integers(side // 2, 2 * side + 1, size=2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            box = [x, y, x + w, y + h]
            if not any(_overlaps(box, clear, 6) for clear in keep_clear):
                break
        else:
            continue
        fill = _muted_color(rng)
        kind = int(rng.integers(4))
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=fill)
        elif kind == 2:
            draw.polygon([(x, y + h - 1), (x + w // 2, y), (x + w - 1, y + h - 1)], fill=fill)
        else:  # a neutral square the same size as the targets
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=fill)
    for box, color in squares:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[color])
    return image


def _muted_color(rng) -> tuple[int, int, int]:
    """Low-saturation colour (greys, browns, slate): never mistakable for a target colour."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.0, 0.22), rng.uniform(0.3, 0.8)
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_tables(out_dir: Path, rows: list[dict]) -> None:
    import datasets

    from tokbench.synth import quiet_datasets

    columns = ["question_id", "text", "label", "category", "bbox", "bboxes", "colors", "width", "height"]
    with open(out_dir / "test.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**{k: row[k] for k in columns}, "image": row["image_path"]}) + "\n")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.Value("string"),
            "category": datasets.Value("string"),
            "question_id": datasets.Value("int64"),
            "bbox": datasets.List(datasets.Value("int32"), length=4),
            "bboxes": datasets.List(datasets.List(datasets.Value("int32"), length=4)),
            "colors": datasets.List(datasets.Value("string")),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
        }
    )
    table = {name: [r[name] for r in rows] for name in features if name != "image"}
    table["image"] = [{"bytes": r["png"], "path": r["image_path"]} for r in rows]
    with quiet_datasets():
        dataset = datasets.Dataset.from_dict(table, features=features)
        dataset.to_parquet(str(out_dir / "test.parquet"))
