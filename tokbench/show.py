"""Which visual tokens survive: the image once per method, pruned token cells dimmed.

The image is drawn as the model's token tiles cover it (`ModelAdapter.token_tiles`: each tile's pixel box,
resized to its grid; Qwen-VL: the whole image; LLaVA: the processor's centre square; InternVL: each tile,
then the thumbnail, side by side), so grid cells align with the model's tokens for any aspect ratio. A token
counts as kept when it survives the method's last stage (what decoding attends to).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tokbench.models.base import ModelAdapter, Tile
from tokbench.pruner import Budget, Stage, build_method

GAP_PX = 6  # between the tiles of one image


def tile_view(image: Image.Image, tile: Tile) -> Image.Image:
    """The pixels ``tile`` covers, resized so that each of its tokens is a whole number of pixels."""
    rows, cols = tile.grid
    x0, y0, x1, y1 = tile.box
    cell_w, cell_h = max(4, round((x1 - x0) / cols)), max(4, round((y1 - y0) / rows))
    region = image.convert("RGB").crop(tuple(round(v) for v in tile.box))
    return region.resize((cols * cell_w, rows * cell_h), Image.BICUBIC)


def tiles_view(image: Image.Image, tiles: list[Tile], mask: np.ndarray, dim: float = 0.25) -> Image.Image:
    """Every tile of ``image`` side by side, the cells of tokens where ``mask`` (over the image's tokens,
    tiles in order) is False darkened to ``dim`` brightness."""
    views, start = [], 0
    for tile in tiles:
        views.append(dim_pruned(tile_view(image, tile), tile.grid, mask[start : start + tile.n_tokens], dim))
        start += tile.n_tokens
    canvas = Image.new("RGB", (sum(v.width for v in views) + GAP_PX * (len(views) - 1), max(v.height for v in views)), "white")
    left = 0
    for view in views:
        canvas.paste(view, (left, 0))
        left += view.width + GAP_PX
    return canvas


def kept_mask(kept_index: dict[str, list[int]], n_visual: int) -> np.ndarray:
    """(n_visual,) bool: tokens kept by the last stage that acted (all, when none did)."""
    mask = np.zeros(n_visual, dtype=bool)
    if not kept_index:
        mask[:] = True
        return mask
    mask[list(kept_index.values())[-1]] = True
    return mask


def dim_pruned(view: Image.Image, grid: tuple[int, int], mask: np.ndarray, dim: float = 0.25) -> Image.Image:
    """``view`` with the cells of tokens where ``mask`` is False darkened to ``dim`` brightness."""
    rows, cols = grid
    pixels = np.asarray(view, dtype=np.float32)
    cell_h, cell_w = pixels.shape[0] // rows, pixels.shape[1] // cols
    factor = np.where(mask.reshape(rows, cols), 1.0, dim).repeat(cell_h, 0).repeat(cell_w, 1)
    return Image.fromarray((pixels * factor[..., None]).clip(0, 255).astype(np.uint8))


def run_methods(adapter: ModelAdapter, image: Image.Image, question: str, methods: list[str], budget: Budget,
                method_args: dict[str, dict[str, str]] | None = None, max_new_tokens: int = 16) -> list[dict]:
    """One panel per method: the dimmed view, kept count, retention and the answer."""
    from tokbench.engine import Engine

    panels = []
    for name in methods:
        method = build_method(name, None if name == "full" else budget, (method_args or {}).get(name))
        source = image
        if any(s.stage == Stage.INPUT for s in method.stages(adapter.info())):
            source = adapter.resize_to_tokens(image, budget.count(adapter.n_visual_tokens(image)))
        out = Engine(adapter, method, record_kept=True).generate([[image]], [question], [0], max_new_tokens)
        sample = out.samples[0]
        tiles = adapter.token_tiles(source)
        mask = kept_mask(sample.kept_index, sum(t.n_tokens for t in tiles))
        panels.append({
            "method": name,
            "view": tiles_view(source, tiles, mask),
            "kept": int(mask.sum()),
            "retention": int(mask.sum()) / sample.n_visual,
            "answer": printable(sample.text),
        })
    return panels


def saved_overlay(image: Image.Image, row: dict) -> tuple[Image.Image, int, int]:
    """The first image of a ``--save-masks`` row, pruned cells dimmed: (view, kept, tokens of that image).

    ``row`` carries ``kept_index`` (indices over all the sample's visual tokens, per stage) and
    ``token_tiles`` (per image, the tiles the model saw as [rows, cols, x0, y0, x1, y1], after any
    input-stage downsampling, boxes in the pixels of the image as run).
    """
    if not row.get("token_tiles"):
        raise ValueError(f"doc {row.get('doc_id')} of run {row.get('run_id')} has no saved masks; rerun it with --save-masks")
    images = [[Tile.from_row(t) for t in tiles] for tiles in row["token_tiles"]]
    n_first = sum(t.n_tokens for t in images[0])
    mask = kept_mask(row.get("kept_index") or {}, sum(t.n_tokens for tiles in images for t in tiles))[:n_first]
    return tiles_view(image, images[0], mask), int(mask.sum()), n_first


class DocSource:
    """The documents of saved runs, read back through each run's task (one load per task and data dir)."""

    def __init__(self) -> None:
        self._tasks: dict[tuple, object] = {}

    def doc(self, manifest: dict, doc_id: int):
        from tokbench.tasks import load_task

        config = manifest["config"]
        key = (config["task"], config.get("data_dir"))
        if key not in self._tasks:
            self._tasks[key] = load_task(*key)
        return self._tasks[key].doc(doc_id)


def printable(text: str) -> str:
    return "".join(ch for ch in str(text).strip() if ch.isprintable())


def run_panels(run_dirs: list[Path], doc_id: int) -> list[dict]:
    """One panel per saved run for document ``doc_id``, from its ``--save-masks`` record."""
    from tokbench.store import RunStore

    docs, panels = DocSource(), []
    for run_dir in run_dirs:
        store = RunStore(Path(run_dir).parent, Path(run_dir).name)
        manifest = store.manifest()
        row = next((r for r in store.records() if r["doc_id"] == doc_id), None)
        if row is None or row.get("error"):
            raise ValueError(f"{run_dir} has no result for doc {doc_id}" + (f" ({row['error']})" if row else ""))
        view, kept, _ = saved_overlay(docs.doc(manifest, doc_id).images[0], row)
        panels.append({"method": f"{row['method']} {row['budget']}", "view": view, "kept": kept,
                       "retention": row["retention"], "answer": printable(row["prediction"])})  # fmt: skip
    return panels


def draw(panels: list[dict], out: Path) -> list[Path]:
    """A row of panels titled method / retention / answer; writes ``out`` (and its .pdf/.png twin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.imshow(panel["view"])
        answer = panel["answer"][:24] + ("…" if len(panel["answer"]) > 24 else "")
        ax.set_title(f"{panel['method']}\n{panel['kept']} tokens ({panel['retention']:.0%})\n“{answer}”", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        path = out.with_suffix(suffix)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written
