"""`pool`: 2-D average pooling of each visual token grid down to the budget (a common baseline).

Budget split over tiles: a sample's ``B`` tokens (over all its visual tokens, every image and tile) are
shared among its ``T`` tiles in proportion to their sizes ``n_t`` by largest remainder: tile ``t`` gets
``floor(B n_t / N)`` (``N = sum n_t``), and the ``B - sum floor(...)`` tokens left go one each to the
tiles with the largest remainders ``B n_t mod N``, ties to the lower tile index. A tile whose share is
0 (only when ``B < T``) keeps nothing.
Each tile's grid (rows x cols) is pooled on its own, adaptively to (r', c') with r'c' <= its share and
the aspect ratio kept; each pooled token takes the position of the tile's token at its cell's centre.
The kept count is the sum of the r'c', which may fall a little under the budget when a share does not
factor to its tile's shape. With one tile this is plain pooling of the image grid to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.tiles import tile_offsets
from tokbench.pruner import Budget, KeepDecision, ModelInfo, Pruner, Stage, StageInputs, StageSpec, register_method


def pooled_grid(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The largest (r', c') with r' <= rows, c' <= cols, r'c' <= budget, r'/c' close to rows/cols.

    A budget of 0 gives (0, 0): the tile keeps nothing.
    """
    if budget <= 0:
        return (0, 0)
    best = (1, 1)
    for r in range(1, rows + 1):
        c = min(cols, budget // r, max(1, round(r * cols / rows)))
        if c >= 1 and r * c <= budget and r * c > best[0] * best[1]:
            best = (r, c)
    return best


def tile_shares(budget: int, sizes: list[int]) -> list[int]:
    """``budget`` split over tiles of ``sizes`` tokens by largest remainder: ``tile_shares(15, [24, 4]) == [13, 2]``."""
    total = sum(sizes)
    shares = [budget * size // total for size in sizes]
    remainders = [budget * size % total for size in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda t: (-remainders[t], t))
    for t in by_remainder[: budget - sum(shares)]:
        shares[t] += 1
    return shares


def tile_grids_pooled(tile_grids: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """The pooled (r', c') of every tile for a sample budget of ``budget`` tokens."""
    shares = tile_shares(budget, [rows * cols for rows, cols in tile_grids])
    return [pooled_grid(rows, cols, share) for (rows, cols), share in zip(tile_grids, shares)]


def pool_tile(embeds: torch.Tensor, rows: int, cols: int, out: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile's tokens (rows*cols, d) pooled to ``out`` = (r', c') -> (states (r'c', d), centre index (r'c',))."""
    out_r, out_c = out
    grid = embeds.T.reshape(1, -1, rows, cols).float()  # (1, d, rows, cols)
    pooled = F.adaptive_avg_pool2d(grid, (out_r, out_c))[0].flatten(1).T  # (r'c', d)
    centre_r = ((torch.arange(out_r) + 0.5) * rows / out_r).long().clamp(max=rows - 1)
    centre_c = ((torch.arange(out_c) + 0.5) * cols / out_c).long().clamp(max=cols - 1)
    return pooled, (centre_r[:, None] * cols + centre_c[None, :]).flatten()


@register_method("pool")
@dataclass
class Pool(Pruner):
    budget: Budget | None
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        return [StageSpec(Stage.EMBED)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return sum(r * c for r, c in tile_grids_pooled(inputs.tile_grids, inputs.budget_count))

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        grids = inputs.tile_grids
        total = sum(rows * cols for rows, cols in grids)
        if inputs.n_visual != total:
            raise ValueError(f"pool needs every tile's full grid ({grids}: {total} tokens), got {inputs.n_visual}")
        embeds = inputs.visual_embeds  # (n, d)
        states, index = [], []
        for (rows, cols), start, out in zip(grids, tile_offsets(grids), tile_grids_pooled(grids, inputs.budget_count)):
            if out[0] * out[1] == 0:
                continue
            pooled, centre = pool_tile(embeds[start : start + rows * cols], rows, cols, out)
            states.append(pooled)
            index.append(start + centre)
        return KeepDecision(torch.cat(index), states=torch.cat(states).to(embeds.dtype))
