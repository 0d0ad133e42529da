"""Kept-token overlays: exactly the pruned cells are dimmed, on both families and non-square images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noise_image, tiny_adapter
from PIL import Image

from tokbench.pruner import Budget
from tokbench.show import draw, model_view, run_methods


def _dimmed_cells(view: Image.Image, reference: Image.Image, grid) -> int:
    rows, cols = grid
    a = np.asarray(view, dtype=np.float32).reshape(rows, view.height // rows, cols, view.width // cols, 3)
    b = np.asarray(reference, dtype=np.float32).reshape(rows, view.height // rows, cols, view.width // cols, 3)
    return int((a.mean(axis=(1, 3, 4)) < b.mean(axis=(1, 3, 4)) * 0.5).sum())


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_random_budget_dims_exactly_the_pruned_cells(family, tmp_path):
    adapter = tiny_adapter(family)
    image = Image.fromarray(np.full((336, 448, 3), 200, dtype=np.uint8))  # non-square, uniform
    grid = adapter.token_grid(image)
    full, random = run_methods(adapter, image, "q?", ["full", "random"], Budget.tokens(10), max_new_tokens=1)
    reference = model_view(adapter, image)
    assert full["view"].size == reference.size
    assert reference.width // grid[1] == reference.height // grid[0]  # square cells aligned with tokens
    assert _dimmed_cells(full["view"], reference, grid) == 0
    assert _dimmed_cells(random["view"], reference, grid) == grid[0] * grid[1] - 10
    written = draw([full, random], tmp_path / "fig.png")
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in written)
    assert Image.open(written[0]).width > 100


def test_qwen_grid_follows_aspect_ratio():
    adapter = tiny_adapter("tiny-qwen2.5-vl")
    assert adapter.token_grid(noise_image(448, 336)) == (12, 16)
    assert model_view(adapter, noise_image(448, 336)).size == (16 * 28, 12 * 28)
