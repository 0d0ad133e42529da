"""DART: budget schedule, exact counts, a step-by-step reference of the pivot/duplication rule, the engine."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.dart import DART, duplication_select, kept_after, quotas
from tokbench.engine import Engine
from tokbench.pruner import Budget, BudgetError, MethodError, ModelInfo, Stage, StageInputs, build_method, plan_stages

LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
TINY = ModelInfo("tiny", 4, 64, 4, 4, -2, (0, 1, 2, 3), 1, has_cls=True)


def _inputs(hidden, budget_count, extras=None):
    n = hidden.shape[0]
    return StageInputs(
        n_visual=n, n_visual_original=n, tile_grids=[(1, n)], token_rc=torch.zeros(n, 2, dtype=torch.long),
        budget_count=budget_count, hidden_states=hidden, extras=extras or {},
    )


def _reference(visual, visual_score, text, text_score, total, pivot_image, pivot_text):
    """Plain-Python DART: pivots by score, then each pivot claims its quota of least-similar free tokens."""
    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    n = len(visual)
    image_pivots = sorted(range(n), key=lambda i: -visual_score[i])[: min(pivot_image, total)]
    text_pivots = sorted(range(len(text)), key=lambda i: -text_score[i])[:pivot_text]
    pivots = [visual[i] for i in image_pivots] + [text[i] for i in text_pivots]
    remaining = total - len(image_pivots)
    shares = [remaining // len(pivots) + (p < remaining % len(pivots)) for p in range(len(pivots))]
    kept, free = set(image_pivots), [i for i in range(n) if i not in image_pivots]
    for pivot, share in zip(pivots, shares):
        claimed = sorted(free, key=lambda i: cos(visual[i], pivot))[:share]
        kept.update(claimed)
        free = [i for i in free if i not in claimed]
    return sorted(kept)


def test_budget_maps_to_the_tokens_kept_after_layer_k():
    # the official 192/128/64 settings keep 4 + 8 * (T // 8) = 196/132/68 tokens after layer 2 of 32;
    # their layer averages 219.75/159.75/99.75 are --budget 220/160/100
    assert [kept_after(b, 576, 32, 2) for b in (220, 160, 100)] == [196, 132, 68]
    assert kept_after(576, 576, 32, 2) == 576
    assert kept_after(8, 16, 4, 1) == 5  # round((32 - 16) / 3)
    with pytest.raises(MethodError, match="unreachable"):
        kept_after(4, 16, 4, 2)  # the first 2 of 4 layers alone average 8


def test_quotas_split_evenly_and_sum_exactly():
    assert quotas(128, 8) == [16] * 8
    assert quotas(10, 4) == [3, 3, 2, 2]
    assert quotas(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("total", [1, 3, 7, 12, 20])
def test_selection_matches_the_step_by_step_reference(seed, total):
    gen = torch.Generator().manual_seed(seed)
    visual, text = torch.randn(20, 6, generator=gen), torch.randn(5, 6, generator=gen)
    visual_score, text_score = torch.rand(20, generator=gen), torch.rand(5, generator=gen)
    got = duplication_select(visual, visual_score, text, text_score, total, 4, 2)
    want = _reference(visual.tolist(), visual_score.tolist(), text.tolist(), text_score.tolist(), total, 4, 2)
    assert got.tolist() == want
    assert got.numel() == total


def test_each_pivot_claims_the_tokens_least_similar_to_it():
    # token 0 is the pivot (largest score); tokens 3 and 4 point away from it, 1 and 2 duplicate it
    visual = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [-1.0, 0.2], [0.0, 1.0]])
    score = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0])
    keep = duplication_select(visual, score, visual[:0], score[:0], 3, 1, 0)
    assert keep.tolist() == [0, 3, 4]


def test_method_uses_keys_text_pivots_and_the_final_norm_when_the_engine_hands_them():
    gen = torch.Generator().manual_seed(7)
    hidden, text = torch.randn(16, 8, generator=gen), torch.randn(4, 8, generator=gen)
    keys, text_keys = torch.randn(16, 2, 4, generator=gen), torch.randn(4, 2, 4, generator=gen)
    weight = torch.rand(8, generator=gen) * 2
    extras = {"visual_keys": keys, "text_keys": text_keys, "text_hidden_states": text, "final_norm_weight": weight}
    method = build_method("dart", Budget.tokens(8), {"k": "1"})
    spec = method.stages(TINY)[0]
    assert (spec.stage, spec.layer) == (Stage.LLM, 0)
    inputs = _inputs(hidden, 8, extras)
    count = method.stage_count(spec, inputs)  # round((8 * 4 - 16) / 3) = 5
    want = _reference(
        (hidden * weight).tolist(), keys.abs().sum((1, 2)).tolist(), (text * weight).tolist(),
        text_keys.abs().sum((1, 2)).tolist(), count, 4, 4,
    )
    assert method.select(spec, inputs).keep_index.tolist() == want
    # without those inputs: hidden-state L1 norm pivots, image pivots only
    fallback = _reference(hidden.tolist(), hidden.abs().sum(1).tolist(), [], [], count, 4, 0)
    assert method.select(spec, _inputs(hidden, 8)).keep_index.tolist() == fallback


def test_settings_are_checked_before_running():
    with pytest.raises(MethodError, match="k=4"):
        DART(Budget.ratio(0.5), k=4).stages(TINY)
    with pytest.raises(MethodError, match="fixed number"):
        DART(Budget.dynamic()).stages(TINY)
    assert DART(Budget.tokens(160)).stages(LLAVA_7B)[0].layer == 1  # official pruned_layer 2


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_engine_keeps_every_token_before_k_and_the_count_after(family):
    adapter = tiny_adapter(family)
    method = build_method("dart", Budget.ratio(0.5), {"k": "1"})
    out = Engine(adapter, method).generate([[noise_image(448, 336, seed=1)]], ["Where is the square?"], [0], 2)
    sample = out.samples[0]
    n = sample.n_visual
    after = kept_after(round(0.5 * n), n, 4, 1)
    assert sample.kept_per_layer == [n, after, after, after]
    assert sample.n_kept_input == n


def test_unreachable_ratio_is_refused_before_loading_with_a_working_k():
    deep = ModelInfo("deep", 12, 64, 4, 4, -1, (1, 3), 4, position_rows=3)
    with pytest.raises(BudgetError, match=r"0\.1 is unreachable with k=2 of 12 layers .* pass --method-arg k=1"):
        plan_stages(build_method("dart", Budget.ratio(0.1)), deep)
    assert plan_stages(build_method("dart", Budget.ratio(0.1), {"k": "1"}), deep)[0].layer == 0
