"""Kept-token overlays: exactly the pruned cells are dimmed, on both families and non-square images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noise_image, tiny_adapter
from PIL import Image

from tokbench.pruner import Budget
from tokbench.show import GAP_PX, draw, run_methods, tile_view, tiles_view


def _dimmed_cells(view: Image.Image, reference: Image.Image, grid) -> int:
    rows, cols = grid
    a = np.asarray(view, dtype=np.float32).reshape(rows, view.height // rows, cols, view.width // cols, 3)
    b = np.asarray(reference, dtype=np.float32).reshape(rows, view.height // rows, cols, view.width // cols, 3)
    return int((a.mean(axis=(1, 3, 4)) < b.mean(axis=(1, 3, 4)) * 0.5).sum())


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_random_budget_dims_exactly_the_pruned_cells(family, tmp_path):
    adapter = tiny_adapter(family)
    image = Image.fromarray(np.full((336, 448, 3), 200, dtype=np.uint8))  # non-square, uniform
    (tile,) = adapter.token_tiles(image)
    grid = tile.grid
    full, random = run_methods(adapter, image, "q?", ["full", "random"], Budget.tokens(10), max_new_tokens=1)
    reference = tiles_view(image, [tile], np.ones(tile.n_tokens, dtype=bool))
    assert full["view"].size == reference.size
    assert reference.width // grid[1] == reference.height // grid[0]  # square cells aligned with tokens
    assert _dimmed_cells(full["view"], reference, grid) == 0
    assert _dimmed_cells(random["view"], reference, grid) == grid[0] * grid[1] - 10
    written = draw([full, random], tmp_path / "fig.png")
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in written)
    assert Image.open(written[0]).width > 100


def test_tiles_follow_each_familys_processor():
    qwen, llava = tiny_adapter("tiny-qwen2.5-vl"), tiny_adapter("tiny-llava")
    image = noise_image(448, 336)
    (tile,) = qwen.token_tiles(image)
    assert tile.grid == (12, 16) and tile.box == (0, 0, 448, 336)  # the whole image, 28 px per token
    assert tiles_view(image, [tile], np.ones(192, dtype=bool)).size == (16 * 28, 12 * 28)
    (tile,) = llava.token_tiles(image)
    assert tile.grid == (16, 16) and tile.box == (56, 0, 392, 336)  # the processor's centre square
    assert tiles_view(image, [tile], np.ones(256, dtype=bool)).size == (16 * 21, 16 * 21)


def test_tiled_image_overlay_dims_exactly_the_pruned_cells_of_every_tile():
    adapter = tiny_adapter("tiny-internvl3")
    image = Image.fromarray(np.full((112, 260, 3), 200, dtype=np.uint8))  # wide: several tiles + thumbnail
    tiles = adapter.token_tiles(image)
    assert len(tiles) > 2 and tiles[-1].box == (0, 0, 260, 112)  # tiles, then the thumbnail over all of it
    n = sum(t.n_tokens for t in tiles)
    full, random = run_methods(adapter, image, "q?", ["full", "random"], Budget.tokens(10), max_new_tokens=1)
    reference = tiles_view(image, tiles, np.ones(n, dtype=bool))
    assert full["view"].size == reference.size
    dimmed, left = 0, 0
    for tile in tiles:  # each tile's panel, left to right
        view = tile_view(image, tile)
        box = (left, 0, left + view.width, view.height)
        dimmed += _dimmed_cells(random["view"].crop(box), reference.crop(box), tile.grid)
        left += view.width + GAP_PX
    assert dimmed == n - 10 and random["kept"] == 10
