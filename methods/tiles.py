"""Where each visual token of a sample lies: its tile (token grid) and the tiles' token ranges.

A sample's visual tokens are its images' tiles concatenated (`StageInputs.tile_grids`: images in order,
tiles in order), raster order within a tile. ``StageInputs.token_tile`` says which tile a current token
belongs to; ``None`` (tests, single-grid callers) means every token is in tile 0.
"""

from __future__ import annotations

import itertools

import torch

from tokbench.pruner import StageInputs


def token_tiles(inputs: StageInputs) -> torch.Tensor:
    """(n,) LongTensor: the tile index of each current visual token (zeros when the engine gave none)."""
    if inputs.token_tile is not None:
        return inputs.token_tile.long()
    return torch.zeros(inputs.n_visual, dtype=torch.long, device=inputs.token_rc.device)


def tile_offsets(tile_grids: list[tuple[int, int]]) -> list[int]:
    """Index of each tile's first token among the sample's original visual tokens: [(2, 3), (1, 2)] -> [0, 6]."""
    return [0, *itertools.accumulate(rows * cols for rows, cols in tile_grids)][:-1]
