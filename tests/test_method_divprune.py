"""DivPrune: the max-min diversity rule on planted inputs, and end-to-end counts."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.divprune import max_min_diverse
from tokbench.engine import Engine
from tokbench.pruner import Budget, build_method


def test_keeps_one_point_per_planted_cluster():
    torch.manual_seed(0)
    centres = torch.eye(8)[:5] * 10  # 5 orthogonal directions
    points = torch.cat([c + 0.05 * torch.randn(6, 8) for c in centres])  # 6 near-duplicates each
    order = torch.randperm(points.shape[0])
    kept = max_min_diverse(points[order], 5)
    clusters = {int(order[i]) // 6 for i in kept}
    assert clusters == set(range(5))


def test_first_pick_is_the_most_isolated_token():
    points = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.0, 1.0]])  # the last is far from all
    assert max_min_diverse(points, 1).tolist() == [3]


def test_greedy_matches_max_min_objective_on_small_sets():
    torch.manual_seed(1)
    for _ in range(5):
        x = torch.randn(7, 4)
        kept = max_min_diverse(x, 3)
        d = 1 - torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T

        def score(s):
            return min(d[i, j] for i, j in itertools.combinations(s, 2))

        best = max(score(s) for s in itertools.combinations(range(7), 3))
        assert score(kept.tolist()) >= 0.5 * best - 1e-6  # greedy MMDP is a 1/2-approximation
        assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == 3


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_end_to_end_exact_count_and_deterministic(family):
    adapter = tiny_adapter(family)
    method = build_method("divprune", Budget.tokens(12))
    runs = [Engine(adapter, method, record_kept=True).generate([[noise_image(448, 336)]], ["q?"], [0], 1) for _ in range(2)]
    sample = runs[0].samples[0]
    assert sample.n_kept_input == 12 and sample.kept_per_layer == [12] * adapter.n_layers
    assert runs[0].samples[0].kept_index == runs[1].samples[0].kept_index
