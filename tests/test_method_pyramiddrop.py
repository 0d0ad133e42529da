"""PyramidDrop: stage layout, lambda solver, exact per-stage counts, ranking, and both tiny models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.pyramiddrop import (
    PyramidDrop,
    layer_average,
    solve_lambda,
    stage_count,
    stage_weights,
)
from tokbench.engine import Engine
from tokbench.metrics import retention_figures
from tokbench.pruner import Budget, ModelInfo, Stage, StageInputs, build_method

LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
LLAVA_13B = ModelInfo("llava-1.5-13b", 40, 5120, 40, 24, -2, tuple(range(24)), 1, has_cls=True)
QWEN_7B = ModelInfo("qwen2.5-vl-7b", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4, position_rows=3)
TINY = ModelInfo("tiny", 4, 64, 4, 4, -2, (0, 1, 2, 3), 1, has_cls=True)


def _inputs(n, n_original, budget_count, attention=None):
    return StageInputs(
        n_visual=n,
        n_visual_original=n_original,
        tile_grids=[(1, n_original)],
        token_rc=torch.zeros(n, 2, dtype=torch.long),
        budget_count=budget_count,
        text_attention=attention,
    )


def test_official_layout_scores_with_the_next_layer():
    specs = PyramidDrop(None, lam=0.5).stages(LLAVA_7B)
    # official layer_list [8, 16, 24]: drop after 8 layers (0-based 7), scored by layers[8]'s norm and q/k
    assert [(s.stage, s.layer, s.attention_from, s.attention_rope) for s in specs] == [
        (Stage.LLM, 7, "next", True),
        (Stage.LLM, 15, "next", True),
        (Stage.LLM, 23, "next", True),
    ]
    assert [s.layer for s in PyramidDrop(None, lam=0.5).stages(QWEN_7B)] == [6, 13, 20]
    assert [s.layer for s in PyramidDrop(None, lam=0.5).stages(TINY)] == [0, 1, 2]
    # budgets add the early drop after 2 layers; depth-scaled quarters stay
    assert [s.layer for s in PyramidDrop(Budget.tokens(64)).stages(LLAVA_7B)] == [1, 7, 15, 23]
    assert [s.layer for s in PyramidDrop(Budget.tokens(64)).stages(LLAVA_13B)] == [1, 9, 19, 29]
    assert [s.layer for s in PyramidDrop(Budget.ratio(0.5)).stages(TINY)] == [0, 1, 2]  # too shallow for it
    assert [s.layer for s in PyramidDrop(Budget.ratio(0.5), layer_list="[4,12]").stages(LLAVA_7B)] == [3, 11]


def test_paper_lambda_half_keeps_half_quarter_eighth():
    method = PyramidDrop(None, lam=0.5)
    specs = method.stages(LLAVA_7B)
    counts = [method.stage_count(spec, _inputs(576, 576, 576)) for spec in specs]
    assert counts == [288, 144, 72]
    assert layer_average(0.5, stage_weights((8, 16, 24), 32)) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 4)


@pytest.mark.parametrize("ratio", [0.3, 0.46875, 0.6, 0.9, 0.999])
def test_solver_gives_the_requested_average(ratio):
    for bounds, layers in [((8, 16, 24), 32), ((2, 8, 16, 24), 32), ((2, 10, 20, 30), 40), ((1, 2, 3), 4)]:
        weights = stage_weights(bounds, layers)
        lam = solve_lambda(ratio, weights)
        assert 0 < lam <= 1
        assert layer_average(lam, weights) == pytest.approx(ratio, abs=1e-12)
    assert solve_lambda(0.46875, stage_weights((8, 16, 24), 32)) == pytest.approx(0.5)


def test_token_settings_match_the_known_lambdas():
    """192/128/64 on LLaVA-1.5 (layout 2, L/4, L/2, 3L/4): the lambdas of a public PDrop port."""
    cases = [(32, (2, 8, 16, 24), (0.581, 0.437, 0.196)), (40, (2, 10, 20, 30), (0.586, 0.448, 0.225))]
    for layers, bounds, expected in cases:
        weights = stage_weights(bounds, layers)
        got = [solve_lambda(tokens / 576, weights) for tokens in (192, 128, 64)]
        assert got == pytest.approx(expected, abs=1.5e-3)


def test_stage_counts_follow_lambda_exactly():
    method = PyramidDrop(Budget.tokens(64))
    specs = method.stages(LLAVA_7B)
    lam = solve_lambda(64 / 576, stage_weights((2, 8, 16, 24), 32))
    counts = [method.stage_count(spec, _inputs(576, 576, 64)) for spec in specs]
    assert counts == [max(1, math.floor(576 * lam**s)) for s in (1, 2, 3, 4)] == [112, 22, 4, 1]  # last: floor 0 -> 1
    assert stage_count(576, 1.0, 3) == 576 and stage_count(10, 0.01, 2) == 1
    # a count budget solves lambda per image (Qwen: layout 2, 7, 14, 21 of 28)
    qwen = PyramidDrop(Budget.tokens(128))
    first = qwen.stages(QWEN_7B)[0]
    weights = stage_weights((2, 7, 14, 21), 28)
    for n in (1296, 576):
        assert qwen.stage_count(first, _inputs(n, n, 128)) == math.floor(n * solve_lambda(128 / n, weights))
    with pytest.raises(ValueError, match="unreachable"):  # 64 of 1296 is below the 2 of 28 full layers
        qwen.stage_count(first, _inputs(1296, 1296, 64))


def test_unreachable_or_conflicting_budgets_are_refused():
    with pytest.raises(ValueError, match="unreachable"):
        solve_lambda(0.2, stage_weights((8, 16, 24), 32))
    with pytest.raises(ValueError, match="dynamic"):
        PyramidDrop(Budget.dynamic()).stages(LLAVA_7B)
    with pytest.raises(ValueError, match="not both"):
        PyramidDrop(Budget.ratio(0.3), lam=0.5).stages(LLAVA_7B)
    with pytest.raises(ValueError, match="1..31"):
        PyramidDrop(Budget.ratio(0.5), layer_list="8,32").stages(LLAVA_7B)


def test_keeps_the_tokens_with_the_highest_head_averaged_attention():
    g = torch.Generator().manual_seed(0)
    method = PyramidDrop(None, lam=0.5)
    spec = method.stages(LLAVA_7B)[0]
    for _ in range(5):
        attention = torch.rand(8, 576, generator=g) * 1e-3
        order = torch.randperm(576, generator=g)
        planted, spiky = order[:288], order[288:293]
        attention[:, planted] += 0.01  # every head attends to the planted tokens
        attention[0, spiky] += 0.05  # one head only: the max over heads would keep them, the mean does not
        attention = attention / attention.sum(dim=1, keepdim=True)  # rows of a softmax
        kept = method.select(spec, _inputs(576, 576, 576, attention)).keep_index
        assert kept.tolist() == sorted(planted.tolist())  # original order, exactly the planted tokens


QUESTIONS = ["What colour is the square?", "Where is it?"]


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-llava"])
@pytest.mark.parametrize("budget,args", [(Budget.ratio(0.5), {}), (None, {"lam": "0.5"})])
def test_end_to_end_counts_follow_the_schedule(name, budget, args):
    adapter = tiny_adapter(name)
    images = [[noise_image(448, 336, seed=0)], [noise_image(224, 224, seed=1)]]
    method = build_method("pyramiddrop", budget, args)
    out = Engine(adapter, method, record_kept=True).generate(images, QUESTIONS, [0, 1], 4)
    method_again = build_method("pyramiddrop", budget, args)
    again = Engine(adapter, method_again, record_kept=True).generate(images, QUESTIONS, [0, 1], 4)
    for sample, repeat in zip(out.samples, again.samples):
        n = sample.n_visual
        lam = 0.5 if args else solve_lambda(0.5, stage_weights((1, 2, 3), 4))
        assert sample.kept_per_layer == [n] + [max(1, math.floor(n * lam**s)) for s in (1, 2, 3)]
        text = sample.seq_len_per_layer[0] - n
        assert sample.seq_len_per_layer == [text + k for k in sample.kept_per_layer]
        assert sample.kv_len_per_layer == sample.seq_len_per_layer  # earlier layers keep their longer cache
        stages = list(sample.kept_index.values())
        assert [len(s) for s in stages] == sample.kept_per_layer[1:]
        assert all(set(later) <= set(earlier) for earlier, later in itertools.pairwise(stages))  # nested drops
        figures = retention_figures(n, sample.n_kept_input, sample.kept_per_layer, method.headline_retention)
        target = (1 + lam + lam**2 + lam**3) / 4
        assert target - 3 / n <= figures["retention"] <= target + 1e-9
        assert sample.tokens == repeat.tokens and sample.kept_index == repeat.kept_index
