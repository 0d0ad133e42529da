"""DivPrune: the max-min diversity rule on planted inputs, the official first pick, and end-to-end counts."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.divprune import max_min_diverse
from tokbench.engine import Engine
from tokbench.pruner import Budget, MethodError, Stage, StageInputs, StageSpec, build_method


def _inputs(n: int, budget: int, **fields) -> StageInputs:
    return StageInputs(n_visual=n, n_visual_original=n, tile_grids=[(1, n)],
                       token_rc=torch.zeros(n, 2, dtype=torch.long), budget_count=budget, **fields)


def _reference_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The official greedy loop written out: re-reduce the min over the whole chosen set at every step."""
    unit = x / x.norm(dim=1, keepdim=True)
    d = 1 - unit @ unit.T
    n = d.shape[0]
    second = [sorted(d[:, j].tolist())[1] for j in range(n)]
    chosen = [max(range(n), key=lambda j: second[j])]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(d[s, j].item() for s in chosen)))
    return sorted(chosen)


def _planted_clusters(seed: int, clusters: int = 5, size: int = 6, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:clusters] * 10  # orthogonal directions
    points = torch.cat([c + 0.05 * torch.randn(size, dim, generator=g) for c in centres])
    order = torch.randperm(points.shape[0], generator=g)
    return points[order], order // size  # features, cluster of each row


@pytest.mark.parametrize("seed", range(3))
def test_keeps_one_token_per_planted_cluster(seed):
    points, cluster = _planted_clusters(seed)
    kept = max_min_diverse(points, 5)
    assert sorted(cluster[kept].tolist()) == [0, 1, 2, 3, 4]


def test_first_pick_is_the_token_whose_nearest_neighbour_is_farthest():
    # unit vectors at these angles: a tight cluster near 0°, a tight pair near 120°, one token at 60°.
    # The 60° token has the farthest nearest neighbour (52°), so the official rule picks it first; a
    # "largest mean distance" rule would pick the 122° token, "farthest pair" the 0°/122° tokens.
    degrees = torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0, 120.0, 122.0, 60.0])
    points = torch.stack([torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees))], dim=1)
    assert max_min_diverse(points, 1).tolist() == [7]
    assert max_min_diverse(points, 2).tolist() == [6, 7]  # then the token farthest from 60°: 122° (62°)
    assert max_min_diverse(points, 3).tolist() == [0, 6, 7]


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_official_greedy_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=g)
    for k in (1, 2, 5, 13):
        assert max_min_diverse(x, k).tolist() == _reference_divprune(x, k)


def test_degenerate_inputs_still_give_k_unique_tokens():
    x = torch.ones(10, 4)  # all identical: every distance is 0
    kept = max_min_diverse(x, 4).tolist()
    assert kept == sorted(set(kept)) and len(kept) == 4
    assert max_min_diverse(x, 10).tolist() == list(range(10))


def test_vision_features_are_averaged_over_patches():
    points, cluster = _planted_clusters(0)
    n = points.shape[0]
    noise = torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(1)) * 0.01
    hidden = points[:, None, :] + noise  # clusters live in the vision states (n, u=4, d_v)
    random_embeds = torch.randn(n, 16, generator=torch.Generator().manual_seed(2))
    method = build_method("divprune", Budget.tokens(5), {"features": "vision"})
    spec = StageSpec(Stage.VISION, vision_layers=(-1,))
    kept = method.select(spec, _inputs(n, 5, visual_embeds=random_embeds, vision_hidden={-1: hidden})).keep_index
    assert sorted(cluster[kept].tolist()) == [0, 1, 2, 3, 4]
    embeds_method = build_method("divprune", Budget.tokens(5))
    by_embeds = embeds_method.select(StageSpec(Stage.EMBED), _inputs(n, 5, visual_embeds=points))
    assert sorted(cluster[by_embeds.keep_index].tolist()) == [0, 1, 2, 3, 4]


def test_bad_arguments_are_rejected():
    info = tiny_adapter("tiny-llava").info()
    with pytest.raises(MethodError, match="features"):
        build_method("divprune", Budget.tokens(4), {"features": "pixels"}).stages(info)
    with pytest.raises(MethodError, match="--ratio or --budget"):
        build_method("divprune", Budget.dynamic()).stages(info)


@pytest.mark.parametrize("features", ["embeds", "vision"])
@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_end_to_end_exact_count_and_deterministic(family, features):
    adapter = tiny_adapter(family)
    image = noise_image(448, 336)
    n_visual = adapter.n_visual_tokens(image)
    method = build_method("divprune", Budget.tokens(12), {"features": features})
    runs = [Engine(adapter, method, record_kept=True).generate([[image]], ["q?"], [0], 1) for _ in range(2)]
    sample = runs[0].samples[0]
    stage = "embed" if features == "embeds" else "vision"
    assert sample.n_visual == n_visual and sample.n_kept_input == 12
    assert sample.kept_per_layer == [12] * adapter.n_layers
    kept = sample.kept_index[stage]
    assert len(kept) == 12 and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < n_visual
    assert kept == runs[1].samples[0].kept_index[stage]


def test_end_to_end_ratio_budget():
    adapter = tiny_adapter("tiny-llava")
    image = noise_image(112, 112)
    n_visual = adapter.n_visual_tokens(image)
    out = Engine(adapter, build_method("divprune", Budget.ratio(0.098))).generate([[image]], ["q?"], [0], 1)
    assert out.samples[0].n_kept_input == max(1, round(0.098 * n_visual))
    assert math.isclose(out.samples[0].n_kept_input / n_visual, round(0.098 * n_visual) / n_visual)
