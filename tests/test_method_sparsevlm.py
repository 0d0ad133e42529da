"""SparseVLM: schedule (official counts and budgets), raters, DPC-kNN recycling vs a plain reference, engine."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.sparsevlm import SparseVLM, density_peak_merge, recycled, relevance, split_total
from tokbench.engine import Engine
from tokbench.pruner import Budget, BudgetError, MethodError, ModelInfo, StageInputs, build_method, plan_stages

LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
QWEN_7B = ModelInfo("qwen2.5-vl-7b", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4, position_rows=3)
TINY = ModelInfo("tiny", 4, 64, 4, 4, -2, (0, 1, 2, 3), 1, has_cls=True)


def _layer_average(plan, n, layers, n_layers):
    edges = [*layers, n_layers - 1]
    kept = (layers[0] + 1) * n + sum((edges[s + 1] - edges[s]) * total for s, (_, total) in enumerate(plan))
    return kept / n_layers


def test_sparse_layers_scale_with_depth():
    assert [s.layer for s in SparseVLM(Budget.tokens(192)).stages(LLAVA_7B)] == [2, 6, 15]  # official
    assert [s.layer for s in SparseVLM(Budget.tokens(192)).stages(QWEN_7B)] == [2, 5, 13]
    assert [s.layer for s in SparseVLM(Budget.ratio(0.4)).stages(TINY)] == [0, 1, 2]


def test_official_counts_recycle_on_top():
    # score.py's 192-token list: 300, 200, 110 selected; int((int(0.3 p) + 1) / 10) + 1 recycled
    method = SparseVLM(None, counts="300,200,110")
    method.stages(LLAVA_7B)
    assert [recycled(p) for p in (0, 1, 29, 30, 276, 109, 94)] == [0, 1, 1, 2, 9, 4, 3]
    assert method.plan(576, 576) == [(300, 309), (200, 204), (110, 113)]
    assert _layer_average(method.plan(576, 576), 576, [2, 6, 15], 32) == 206.5
    with pytest.raises(MethodError, match="not both"):
        SparseVLM(Budget.tokens(192), counts="300,200,110").stages(LLAVA_7B)
    with pytest.raises(MethodError, match="3 values"):
        SparseVLM(None, counts="300,200").stages(LLAVA_7B)


@pytest.mark.parametrize(("n", "budget"), [(576, 192), (576, 128), (576, 64), (1000, 300), (100, 40)])
def test_budget_schedule_meets_the_layer_average(n, budget):
    info = LLAVA_7B if n != 100 else TINY
    method = SparseVLM(Budget.tokens(budget))
    layers = [s.layer for s in method.stages(info)]
    plan = method.plan(n, budget)
    assert abs(_layer_average(plan, n, layers, info.n_layers) - budget) <= 0.5 * info.n_layers / (info.n_layers - layers[-1] - 1)
    totals = [t for _, t in plan]
    assert totals == sorted(totals, reverse=True) and totals[-1] >= 1
    previous = n
    for selected, total in plan:  # selected + recycled tokens, or no recycling where none fits (total 1)
        assert selected + recycled(previous - selected) == total or selected == total
        previous = total


def test_unreachable_budget_is_refused():
    method = SparseVLM(Budget.tokens(20))  # a count: checked per image (a ratio is refused in stages)
    method.stages(TINY)
    with pytest.raises(MethodError, match="unreachable"):
        method.plan(100, 20)  # layer 0 alone keeps 100 of the 4 layers' average


def test_split_total_inverts_recycling():
    for n in (50, 576, 1200):
        for total in range(2, n):
            selected = split_total(total, n)
            assert selected + recycled(n - selected) == total or selected == total


def _dpc_reference(x, k, noise):
    """Plain-Python DPC-kNN (density peaks on k nearest neighbours), merged by cluster means."""
    n, d = len(x), len(x[0])
    dist = [[math.dist(a, b) / math.sqrt(d) for b in x] for a in x]
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) + noise[i] for i, row in enumerate(dist)]
    top = max(max(row) for row in dist)
    parent = [min([dist[i][j] for j in range(n) if density[j] > density[i]] or [top]) for i in range(n)]
    score = [parent[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:k]
    assign = [min(range(k), key=lambda c: dist[centres[c]][i]) for i in range(n)]
    for c, i in enumerate(centres):
        assign[i] = c
    merged = [[sum(x[i][f] for i in range(n) if assign[i] == c) / assign.count(c) for f in range(d)] for c in range(k)]
    return centres, merged


@pytest.mark.parametrize("seed", range(4))
def test_density_peak_merge_matches_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(14, 5, generator=gen)
    noise = torch.rand(14, generator=gen) * 1e-6
    centres, merged = density_peak_merge(x, 3, noise)
    want_centres, want_merged = _dpc_reference(x.tolist(), 3, noise.tolist())
    assert centres.tolist() == want_centres
    assert torch.allclose(merged, torch.tensor(want_merged), atol=1e-5)


def test_select_keeps_the_most_rated_tokens_and_recycles_the_next_ones():
    gen = torch.Generator().manual_seed(3)
    n, d = 60, 6
    hidden = torch.randn(n, d, generator=gen)
    attention = torch.rand(4, n, generator=gen).softmax(dim=-1)
    method = build_method("sparsevlm", Budget.ratio(0.4))
    spec = method.stages(TINY)[0]
    inputs = StageInputs(
        n_visual=n, n_visual_original=n, tile_grids=[(1, n)], token_rc=torch.zeros(n, 2, dtype=torch.long),
        budget_count=24, hidden_states=hidden, text_attention=attention, generator=torch.Generator().manual_seed(0),
    )
    selected, total = method.plan(n, 24)[0]
    assert total > selected  # this stage recycles
    decision = method.select(spec, inputs)
    score = attention.mean(dim=0)
    ranked = sorted(range(n), key=lambda i: -float(score[i]))
    top, pruned = ranked[:selected], ranked[selected:]
    candidates = pruned[: int(0.3 * len(pruned)) + 1]
    noise = torch.rand(len(candidates), generator=torch.Generator().manual_seed(0)) * 1e-6
    centres, merged = _dpc_reference(hidden[candidates].tolist(), total - selected, noise.tolist())
    assert decision.keep_index.tolist() == sorted(top + [candidates[c] for c in centres])
    by_index = dict(zip(decision.keep_index.tolist(), decision.states))
    for i in top:
        assert torch.equal(by_index[i], hidden[i])
    for c, i in enumerate(centres):
        assert torch.allclose(by_index[candidates[i]], torch.tensor(merged[c]), atol=1e-5)


def test_raters_are_the_prompt_tokens_more_relevant_than_average():
    gen = torch.Generator().manual_seed(5)
    n, m = 8, 5
    visual, prompt = torch.randn(n, 4, generator=gen), torch.randn(m, 4, generator=gen)
    rows = torch.rand(m, 2, n, generator=gen)
    inputs = StageInputs(
        n_visual=n, n_visual_original=n, tile_grids=[(1, n)], token_rc=torch.zeros(n, 2, dtype=torch.long),
        budget_count=4,
        extras={"prompt_attention": rows, "prompt_embeds": prompt, "visual_input_embeds": visual},
    )
    affinity = [0.0] * m
    for v in visual:  # softmax over prompt tokens per visual token, then mean over visual tokens
        logits = [float(v @ p) for p in prompt]
        total = sum(math.exp(x) for x in logits)
        for j, x in enumerate(logits):
            affinity[j] += math.exp(x) / total / n
    raters = [j for j in range(m) if affinity[j] > sum(affinity) / m]
    want = torch.stack([rows[j].mean(dim=0) for j in raters]).mean(dim=0)
    assert torch.allclose(relevance(inputs), want, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_engine_follows_the_plan(family):
    adapter = tiny_adapter(family)
    method = build_method("sparsevlm", Budget.ratio(0.4))
    out = Engine(adapter, method).generate([[noise_image(448, 336, seed=4)]], ["Where is the square?"], [0], 2)
    sample = out.samples[0]
    n = sample.n_visual
    totals = [t for _, t in method.plan(n, round(0.4 * n))]
    assert sample.kept_per_layer == [n, *totals]


def test_unreachable_ratio_is_refused_before_loading():
    deep = ModelInfo("deep", 12, 64, 4, 4, -1, (1, 3), 4, position_rows=3)
    with pytest.raises(BudgetError, match=r"0\.1 is unreachable on 12 layers: layers 0\.\.1 keep every token"):
        plan_stages(build_method("sparsevlm", Budget.ratio(0.1)), deep)
    assert len(plan_stages(build_method("sparsevlm", Budget.ratio(0.25)), deep)) == 3
