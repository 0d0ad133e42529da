"""Pool: the budget split over tiles, each tile's grid pooled on its own, exact counts (no model needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.pool import pooled_grid, tile_shares
from tokbench.pruner import Budget, Stage, StageInputs, StageSpec, build_method

EMBED = StageSpec(Stage.EMBED)


def _inputs(grids: list[tuple[int, int]], budget: int, d: int = 3, seed: int = 0) -> StageInputs:
    rc = torch.cat([torch.stack(torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij"), -1).reshape(-1, 2)
                    for r, c in grids])  # fmt: skip
    tile = torch.cat([torch.full((r * c,), t) for t, (r, c) in enumerate(grids)])
    n = rc.shape[0]
    embeds = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return StageInputs(n, n, grids, rc, budget, visual_embeds=embeds, token_tile=tile)


def test_shares_are_proportional_with_largest_remainder():
    assert tile_shares(14, [24, 4]) == [12, 2]  # exact: 14 * 24 / 28 = 12
    assert tile_shares(15, [24, 4]) == [13, 2]  # 12.86 / 2.14: the one left over goes to the larger remainder
    assert tile_shares(5, [4, 4, 4]) == [2, 2, 1]  # equal remainders: lower tile index first
    assert tile_shares(2, [4, 4, 4]) == [1, 1, 0]  # fewer tokens than tiles: the last tile keeps nothing
    for budget in range(1, 29):
        assert sum(tile_shares(budget, [24, 4])) == budget


def test_two_tiles_of_different_grids_keep_the_exact_count_per_tile():
    grids = [(4, 6), (2, 2)]  # 24 + 4 tokens; budget 14 -> shares 12 and 2 -> pooled 3x4 and 2x1
    inputs = _inputs(grids, 14)
    method = build_method("pool", Budget.tokens(14))
    decision = method.select(EMBED, inputs)
    assert method.stage_count(EMBED, inputs) == decision.keep_index.numel() == 12 + 2
    first, second = decision.keep_index[:12], decision.keep_index[12:]
    assert first.max() < 24 and second.min() >= 24  # each tile's pooled tokens sit in that tile
    grid0 = inputs.visual_embeds[:24].T.reshape(1, 3, 4, 6)
    torch.testing.assert_close(decision.states[:12], F.adaptive_avg_pool2d(grid0, (3, 4))[0].flatten(1).T)
    tile1 = inputs.visual_embeds[24:]  # rows (t0, t1) and (t2, t3) of the 2x2 tile, each averaged alone
    torch.testing.assert_close(decision.states[12:], torch.stack([tile1[:2].mean(0), tile1[2:].mean(0)]))
    assert second.tolist() == [24 + 1, 24 + 3]  # centre tokens (cell centre col 1.0): (0, 1) and (1, 1) of tile 1
    assert decision.keep_index.tolist() == sorted(decision.keep_index.tolist())


@pytest.mark.parametrize("budget", [1, 2, 5, 13, 15, 27, 28])
def test_kept_count_is_the_sum_of_the_documented_per_tile_grids(budget):
    grids = [(4, 6), (2, 2)]
    expected = [pooled_grid(r, c, share) for (r, c), share in zip(grids, tile_shares(budget, [24, 4]))]
    decision = build_method("pool", Budget.tokens(budget)).select(EMBED, _inputs(grids, budget))
    per_tile = torch.bincount((decision.keep_index >= 24).long(), minlength=2).tolist()
    assert per_tile == [r * c for r, c in expected] and sum(per_tile) <= budget
    assert decision.states.shape == (sum(per_tile), 3)


def test_one_tile_is_plain_pooling_and_partial_grids_are_refused():
    inputs = _inputs([(6, 6)], 9)
    decision = build_method("pool", Budget.tokens(9)).select(EMBED, inputs)
    grid = inputs.visual_embeds.T.reshape(1, 3, 6, 6)
    torch.testing.assert_close(decision.states, F.adaptive_avg_pool2d(grid, (3, 3))[0].flatten(1).T)
    assert decision.keep_index.tolist() == [r * 6 + c for r in (1, 3, 5) for c in (1, 3, 5)]
    short = _inputs([(6, 6)], 9)
    short.n_visual = 35
    with pytest.raises(ValueError, match="every tile's full grid"):
        build_method("pool", Budget.tokens(9)).select(EMBED, short)
