"""Decoding task images: strict (a truncated or corrupt file is an error) and, given the model's pixel
budget, downscaled while decoding without changing what the model sees.

Strict: lmms-eval sets PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, which makes a cut-off
PNG or JPEG decode "successfully" with grey rows. ``decode_image`` turns the flag off while it decodes
(and restores it), so such a file raises ``OSError`` and becomes its document's error. PIL's
decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, refused above twice that) stays in force; the
warning PIL prints between once and twice the limit is not shown (the image is downscaled anyway).

Downscaled: with ``max_pixels`` (Qwen2.5-VL's dynamic-resolution cap: the processor resizes an image
to at most that many pixels on a ``GRID_FACTOR``-pixel grid, transformers' ``smart_resize``), an image
larger than the model's target is reduced by an integer factor r (JPEG: DCT scaling with ``draft``,
which never decodes the full image; other formats: ``Image.reduce`` after decoding, which frees the full
image before the processor sees it). r is the largest factor whose reduced size is still at least the
model's target size in both dimensions *and* gives the same ``smart_resize`` target, i.e. the same token
grid, as the original: e.g. 12000 x 12000 at ``max_pixels=50176`` → 224 x 224 target, r = 53 → 227 x 227.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

GRID_FACTOR = 28  # Qwen2.5-VL: 14-pixel patches merged 2x2
MIN_PIXELS = 56 * 56  # Qwen2.5-VL's processor default (shortest_edge)

_REDUCIBLE = ("RGB", "RGBA", "L", "LA", "I", "F")
_FLAG_LOCK = threading.RLock()
_BUDGET: ContextVar[int | None] = ContextVar("tokbench_max_pixels", default=None)


@contextmanager
def pixel_budget(max_pixels: int | None) -> Iterator[None]:
    """Inside the block, ``decode_image`` calls without ``max_pixels`` use this one (task hooks such as
    Visual-CoT's ``doc_to_visual`` open image files themselves)."""
    token = _BUDGET.set(max_pixels)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def decode_image(source: Any, max_pixels: int | None = None) -> Image.Image:
    """An RGB image from ``source``: bytes, a path, a ``{"bytes", "path"}`` dict (a ``datasets.Image``
    column read with ``decode=False``) or an opened, not yet loaded PIL image.

    ``max_pixels`` (default: the enclosing ``pixel_budget``): reduce as the module docstring says.
    Raises ``OSError`` (truncated or undecodable data, ``PIL.UnidentifiedImageError``, a missing file)
    or ``PIL.Image.DecompressionBombError``. The returned image's ``info["tokbench_original_size"]`` is the
    stored (width, height) before any reduction.
    """
    max_pixels = max_pixels if max_pixels is not None else _BUDGET.get()
    with _strict():
        image = _open(source)
        original = image.size
        target = _target(image.width, image.height, max_pixels) if max_pixels else None
        if target and image.format == "JPEG":
            scale = _best_factor(image.width, image.height, target, max_pixels, candidates=(8, 4, 2))
            if scale > 1:
                image.draft("RGB", _reduced(image.width, image.height, scale))
                if _target(image.width, image.height, max_pixels) != target:  # PIL chose another scale
                    image = _open(source)
        image.load()
        if target:
            factor = _best_factor(image.width, image.height, target, max_pixels)
            if factor > 1:
                image = image.reduce(factor) if image.mode in _REDUCIBLE else image.convert("RGB").reduce(factor)
        image = image.convert("RGB")
        image.info["tokbench_original_size"] = original
        return image


def max_pixels_of(adapter) -> int | None:
    """The ``max_pixels`` hint for a loaded model adapter (`ModelAdapter.decode_pixel_cap`): the processor's
    pixel cap where the family resizes with ``smart_resize`` on a ``GRID_FACTOR`` grid; None (no
    downscaling) for the others (LLaVA resizes every image to a fixed square whatever its size)."""
    return adapter.decode_pixel_cap(GRID_FACTOR)


def reduction_factor(width: int, height: int, max_pixels: int) -> int:
    """Largest integer r such that the image reduced by r (``ceil(w / r) x ceil(h / r)``) is at least
    the model's target size in both dimensions and has the same ``smart_resize`` target (1 if none)."""
    return _best_factor(width, height, _target(width, height, max_pixels), max_pixels)


def _best_factor(
    width: int, height: int, target: tuple[int, int], max_pixels: int, candidates: tuple[int, ...] | None = None
) -> int:
    upper = min(width // target[0], height // target[1])
    for factor in candidates or range(upper, 1, -1):
        w, h = _reduced(width, height, factor)
        if factor <= upper and w >= target[0] and h >= target[1] and _target(w, h, max_pixels) == target:
            return factor
    return 1


def _target(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) the Qwen2.5-VL processor resizes a ``width x height`` image to."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, GRID_FACTOR, MIN_PIXELS, max_pixels)
    return w, h


def _reduced(width: int, height: int, factor: int) -> tuple[int, int]:
    return math.ceil(width / factor), math.ceil(height / factor)


def _open(source: Any) -> Image.Image:
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
        if source is None:
            raise OSError("image field holds neither bytes nor a path")
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(Path(source).expanduser())
    return image


@contextmanager
def _strict() -> Iterator[None]:
    """PIL's truncated-image tolerance off (it is a module global lmms-eval turns on) inside the block."""
    with _FLAG_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


# --- task documents ----------------------------------------------------------------------------------------


def load_visuals(doc_to_visual, row: dict, columns: list[str], max_pixels: int | None = None) -> list:
    """A task's ``doc_to_visual`` on ``row`` (read by ``undecoded``) with the image ``columns`` decoded by
    ``tokbench.images.decode_image`` (strict; downscaled to ``max_pixels`` keeping the token grid).

    A task that crops or resizes (its visuals are not the decoded images' sizes) is given the
    full-size images instead, and its visuals are reduced afterwards.
    """
    columns = [c for c in columns if row.get(c) is not None]
    with pixel_budget(max_pixels):
        decoded = {c: _map_images(decode_image, row[c]) for c in columns}
        visuals = as_list(doc_to_visual({**row, **decoded}))
    if max_pixels and columns:
        sizes = {image.size for c in columns for image in as_list(decoded[c])}
        if any(getattr(v, "size", None) not in sizes for v in visuals):
            full = {c: _map_images(decode_image, row[c]) for c in columns}
            visuals = as_list(doc_to_visual({**row, **full}))
            visuals = [decode_image(v, max_pixels) if hasattr(v, "convert") else v for v in visuals]
    return visuals


def undecoded(docs):
    """``docs`` with its image columns left as ``{bytes, path}`` dicts, so that ``decode_image`` decodes
    them (strictly, downscaled); and their names.

    Image columns: ``datasets.Image`` (or a list of them), and plain ``{bytes, path}`` structs, which is
    how an image column reads from a parquet file written without the Hugging Face schema metadata
    (pandas / pyarrow); those become ``datasets.Image`` columns too, so task hooks see images.
    """
    import datasets

    if not isinstance(docs, datasets.Dataset):
        return docs, []
    columns = []
    for column, feature in docs.features.items():
        inner = getattr(feature, "feature", feature)  # List(Image()) / Sequence(Image())
        if isinstance(inner, datasets.Image) or _is_image_struct(inner):
            columns.append(column)
            if not isinstance(inner, datasets.Image) or inner.decode:
                raw = datasets.Image(decode=False)
                docs = docs.cast_column(column, raw if inner is feature else datasets.List(raw))
    return docs, columns


def _is_image_struct(feature) -> bool:
    """``{"bytes": binary, "path": string}``: an image column without its ``datasets.Image`` type."""
    import datasets

    if not isinstance(feature, dict) or set(feature) != {"bytes", "path"}:
        return False
    kinds = {name: getattr(value, "dtype", None) for name, value in feature.items()}
    return isinstance(feature["bytes"], datasets.Value) and kinds == {"bytes": "binary", "path": "string"}


def undecoded_process_docs(process_docs, dataset):
    """A task's ``process_docs`` (or none) followed by ``undecoded``: lmms-eval then builds the task
    (it reads doc 0 to check it) without decoding any image."""
    if process_docs is not None:
        dataset = process_docs(dataset)
    return undecoded(dataset)[0]


def _map_images(fn, value):
    return [fn(v) for v in value] if isinstance(value, (list, tuple)) else fn(value)


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
