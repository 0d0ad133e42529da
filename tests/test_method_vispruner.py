"""VisPruner: important/diverse split, a step-by-step reference of duplicate removal, stages, the engine."""

from __future__ import annotations

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.vispruner import VisPruner, remove_duplicates
from tokbench.engine import Engine
from tokbench.pruner import Budget, MethodError, ModelInfo, Stage, StageInputs, build_method

LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
QWEN_7B = ModelInfo("qwen2.5-vl-7b", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4, position_rows=3)


def _reference(features, importance, total, ratio):
    """Plain-Python VisPruner: top int(T r) by importance, then pairwise matching and pruning in steps of 8."""
    n = len(importance)
    order = sorted(range(n), key=lambda i: (-importance[i], i))
    n_imp = int(total * ratio)
    keep, pool = order[:n_imp], order[n_imp:]
    target = total - n_imp
    while target > 0 and len(pool) > target:
        a, b = pool[0::2], pool[1::2]
        drop = min(8, len(pool) - target, len(a))
        best = [max(sum(x * y for x, y in zip(features[i], features[j])) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda p: (-best[p], p))
        pool = [a[p] for p in ranked[drop:]] + b
    return sorted(keep + (pool if target > 0 else []))


def _inputs(importance, hidden, total, cls=True, block=-2):
    n = importance.shape[0]
    stats = {"cls": importance.expand(3, n)} if cls else {"received": importance}
    return StageInputs(
        n_visual=n, n_visual_original=n, tile_grids=[(1, n)], token_rc=torch.zeros(n, 2, dtype=torch.long),
        budget_count=total, vision_hidden={block: hidden}, visual_embeds=hidden.mean(dim=1),
        extras={"vision_attention": {block: stats}},
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("n", "total", "ratio"), [(40, 12, 0.5), (41, 9, 0.5), (40, 20, 0.75), (23, 5, 0.0), (30, 7, 1.0)])
def test_selection_matches_the_step_by_step_reference(seed, n, total, ratio):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 1, 8, generator=gen)
    importance = torch.rand(n, generator=gen)
    method = VisPruner(Budget.tokens(total), important_ratio=ratio)
    spec = method.stages(LLAVA_7B)[0]
    keep = method.select(spec, _inputs(importance, hidden, total)).keep_index
    unit = torch.nn.functional.normalize(hidden[:, 0], dim=-1).tolist()
    assert keep.tolist() == _reference(unit, importance.tolist(), total, ratio)
    assert keep.numel() == total and bool((keep[1:] > keep[:-1]).all())


def test_duplicates_of_an_important_token_region_are_pruned_first():
    # pool order [0, 1, 2, 3]: a = [0, 2], b = [1, 3]; token 2 duplicates token 3, token 0 is unique
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 1.0], [0.0, 0.6, 1.0]]), dim=-1)
    assert remove_duplicates(features, torch.tensor([0, 1, 2, 3]), 3).tolist() == [0, 1, 3]


def test_important_tokens_follow_cls_attention_and_counts_split_by_the_ratio():
    n = 16
    importance = torch.arange(n, dtype=torch.float)  # token 15 most important
    hidden = torch.randn(n, 1, 4, generator=torch.Generator().manual_seed(0))
    method = VisPruner(Budget.tokens(8), important_ratio=0.5)
    keep = method.select(method.stages(LLAVA_7B)[0], _inputs(importance, hidden, 8)).keep_index.tolist()
    assert {12, 13, 14, 15} <= set(keep) and len(keep) == 8


def test_stages_follow_the_feature_block_and_capabilities():
    llava = VisPruner(Budget.tokens(128)).stages(LLAVA_7B)[0]
    assert (llava.stage, llava.vision_layers, llava.vision_attention) == (Stage.VISION, (-2,), (-2,))
    qwen = VisPruner(Budget.tokens(128)).stages(QWEN_7B)[0]
    assert (qwen.vision_layers, qwen.vision_attention) == ((), (-1,))  # u = 4: projected tokens compared
    assert VisPruner(Budget.tokens(128), features="vision").stages(QWEN_7B)[0].vision_layers == (-1,)
    windowed = ModelInfo("x", 28, 3584, 28, 32, -2, (7, 15, 23, 31), 4, position_rows=3)
    with pytest.raises(MethodError, match="window attention"):
        VisPruner(Budget.tokens(128)).stages(windowed)
    with pytest.raises(MethodError, match="important_ratio"):
        VisPruner(Budget.tokens(128), important_ratio=1.5).stages(LLAVA_7B)


def test_towers_without_cls_rank_by_attention_received():
    n = 12
    received = torch.tensor([0.0] * 8 + [5.0, 6.0, 7.0, 8.0])
    hidden = torch.randn(n, 4, 6, generator=torch.Generator().manual_seed(1))
    method = VisPruner(Budget.tokens(4), important_ratio=1.0)
    keep = method.select(method.stages(QWEN_7B)[0], _inputs(received, hidden, 4, cls=False, block=-1))
    assert keep.keep_index.tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_engine_keeps_exactly_the_budget_before_the_llm(family):
    adapter = tiny_adapter(family)
    method = build_method("vispruner", Budget.ratio(0.25))
    out = Engine(adapter, method).generate([[noise_image(448, 336, seed=2)]], ["Where is the square?"], [0], 2)
    sample = out.samples[0]
    assert sample.n_kept_input == round(0.25 * sample.n_visual)
    assert set(sample.kept_per_layer) == {sample.n_kept_input}
