"""VisionZip: dominant tokens by attention, contextual merge by key similarity, the Qwen2.5-VL port against a
step-by-step reference, counts, and both tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import layer_lengths, noise_image, text_length, tiny_adapter

from methods.visionzip import VisionZip, contextual_merge, split_budget, split_port
from tokbench.engine import Engine
from tokbench.pruner import Budget, MethodError, ModelInfo, Stage, StageInputs, build_method

LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
QWEN_7B = ModelInfo("qwen2.5-vl-7b", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4, position_rows=3)


def _inputs(hidden, stats, budget, block=-2, rows=None, embeds=None):
    n = hidden.shape[0]
    rows = rows or int(n**0.5)
    rc = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(n // rows), indexing="ij"), -1).reshape(-1, 2)
    return StageInputs(
        n_visual=n,
        n_visual_original=n,
        tile_grids=[(rows, n // rows)],
        token_rc=rc,
        budget_count=budget,
        visual_embeds=embeds,
        vision_hidden={block: hidden},
        extras={"vision_attention": {block: stats}},
    )


def _spec(model=LLAVA_7B, variant="auto"):
    return VisionZip(Budget.tokens(64), variant=variant).stages(model)[0]


def test_official_budget_splits():
    assert [split_budget(k, 10 / 64) for k in (64, 128, 192, 160)] == [(54, 10), (108, 20), (162, 30), (135, 25)]
    assert split_budget(1, 10 / 64) == (1, 0)
    assert split_budget(5, 0.9) == (1, 4)  # at least one dominant token
    # the Qwen2.5-VL port: C = max(1, int(0.05 n)); its README's 70% and 50% settings are 65+5 and 45+5
    assert split_port(700, 1000) == (650, 50) and split_port(500, 1000) == (450, 50)
    assert split_port(16, 64) == (13, 3) and split_port(4, 10) == (3, 1) and split_port(2, 1000) == (1, 1)
    assert split_port(1, 1000) == (1, 0)


def test_stages_use_the_feature_block_and_pick_the_variant_by_capability():
    (spec,) = VisionZip(Budget.tokens(64)).stages(LLAVA_7B)
    assert spec.stage == Stage.VISION and spec.vision_layers == (-2,) and spec.vision_attention == (-2,)
    # 4 patches per token: the port, which merges in LLM space and needs no block outputs
    (qwen,) = VisionZip(Budget.ratio(0.1)).stages(QWEN_7B)
    assert qwen.vision_attention == (-1,) and qwen.vision_layers == ()
    assert VisionZip(Budget.ratio(0.1), variant="vision").stages(QWEN_7B)[0].vision_layers == (-1,)
    assert VisionZip(Budget.ratio(0.1), variant="llm").stages(LLAVA_7B)[0].vision_layers == ()
    # no family check: any tower with several patches per token gets the port
    other = ModelInfo("x", 4, 64, 4, 4, -1, (3,), 4)
    assert VisionZip(Budget.ratio(0.1)).stages(other)[0].vision_layers == ()
    windowed = ModelInfo("x", 4, 64, 4, 4, -1, (1, 2), 4)
    with pytest.raises(ValueError, match="window attention"):
        VisionZip(Budget.ratio(0.1)).stages(windowed)
    # bad arguments are refused when the method is built, before any model loads
    with pytest.raises(MethodError, match="variant='clip'; use one of auto, llm, vision"):
        build_method("visionzip", Budget.ratio(0.1), {"variant": "clip"})
    with pytest.raises(MethodError, match=r"contextual_ratio=1.0 must lie in \[0, 1\)"):
        build_method("visionzip", Budget.ratio(0.1), {"contextual_ratio": "1"})


def test_planted_cls_attention_tokens_are_dominant_and_unchanged():
    gen = torch.Generator().manual_seed(0)
    n, planted = 36, [4, 17, 30]
    cls = torch.rand(2, n, generator=gen) * 0.01
    cls[0, planted] = 0.5  # one head only: the heads are summed
    hidden = torch.randn(n, 1, 8, generator=gen)
    keys = torch.randn(n, 1, 2, 4, generator=gen)
    method = VisionZip(Budget.tokens(4), contextual_ratio=0.25)  # 3 dominant + 1 contextual
    decision = method.select(_spec(), _inputs(hidden, {"cls": cls, "keys": keys}, 4))
    assert decision.keep_index.tolist() == [0, 4, 17, 30]  # one anchor: the first non-dominant token
    torch.testing.assert_close(decision.vision_states[1:], hidden[planted])
    others = [i for i in range(n) if i not in planted + [0]]
    torch.testing.assert_close(decision.vision_states[0], hidden[0] + hidden[others].mean(0))


def test_contextual_merge_averages_members_into_their_anchor():
    n = 10
    hidden = torch.arange(n * 3, dtype=torch.float32).reshape(n, 1, 3) ** 1.5
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    key_rows = {2: e1, 3: e1, 4: e1 + 0.1 * e2, 6: e2, 5: e2, 7: e2, 8: 0.1 * e1 + e2, 9: e2, 0: e1, 1: e2}
    head = torch.stack([key_rows[i] for i in range(n)])  # (n, 2)
    noise = 5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    keys = torch.stack([head + noise, head - noise], dim=1)[:, None]  # (n, u=1, h=2, hd=2): head mean = head
    cls = torch.zeros(1, n)
    cls[0, :2] = 1.0  # tokens 0 and 1 are dominant
    method = VisionZip(Budget.tokens(4), contextual_ratio=0.5)  # 2 dominant + 2 contextual
    decision = method.select(_spec(), _inputs(hidden, {"cls": cls, "keys": keys}, 4, rows=2))
    # rest = [2..9], step 8 // 2 = 4 -> anchors 2 and 6
    assert decision.keep_index.tolist() == [0, 1, 2, 6]
    expected_2 = hidden[2] + hidden[[3, 4]].mean(0)
    expected_6 = hidden[6] + hidden[[5, 7, 8, 9]].mean(0)
    torch.testing.assert_close(decision.vision_states[2:], torch.stack([expected_2, expected_6]))
    torch.testing.assert_close(decision.vision_states[:2], hidden[:2])


def test_anchor_without_members_is_unchanged():
    hidden = torch.randn(4, 1, 2)
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.0]])  # all members prefer anchor 0
    anchors, merged = contextual_merge(hidden, keys, torch.tensor([0, 1, 2, 3]), 2)
    assert anchors.tolist() == [0, 2]
    torch.testing.assert_close(merged[1], hidden[2])
    torch.testing.assert_close(merged[0], hidden[0] + hidden[[1, 3]].mean(0))


def test_vision_variant_on_qwen_uses_received_attention_and_merges_per_patch():
    gen = torch.Generator().manual_seed(1)
    n = 16
    received = torch.rand(n, generator=gen)
    received[[5, 9]] = 10.0
    hidden = torch.randn(n, 4, 6, generator=gen)  # (n, u=4, d_v)
    keys = torch.randn(n, 4, 2, 3, generator=gen)
    method = VisionZip(Budget.tokens(3), variant="vision", contextual_ratio=0.34)  # 2 dominant + 1 contextual
    spec = _spec(QWEN_7B, "vision")
    decision = method.select(spec, _inputs(hidden, {"received": received, "keys": keys}, 3, block=-1))
    assert decision.keep_index.tolist() == [0, 5, 9]
    assert decision.vision_states.shape == (3, 4, 6) and decision.states is None
    rest = [i for i in range(1, n) if i not in (5, 9)]
    torch.testing.assert_close(decision.vision_states[0], hidden[0] + hidden[rest].mean(0))


def _port_reference(probs, patch_keys, embeds, dominant_num, contextual_num):
    """The Qwen2.5-VL port's steps, one at a time (dvlab-research/VisionZip 68993a3,
    ``Qwen2_5_VL/qwen2_5vl_visionzip.py``), written independently with plain loops.

    probs (h, 4n, 4n): last-block softmax attention over the patches, token-major (patches 4i..4i+3 form
    token i); patch_keys (h, 4n, hd): that block's keys; embeds (n, d): the merger's outputs.
    Returns the kept token indices (ascending) and the states the LLM receives for them.
    """
    n = patch_keys.shape[1] // 4
    # score: mean over heads, sum over queries, mean over each token's 4 patches
    per_patch = probs.mean(dim=0).sum(dim=0)
    score = [sum(per_patch[4 * i + j] for j in range(4)) / 4 for i in range(n)]
    # key: mean over each token's 4 patches, then over heads
    key = [patch_keys[:, 4 * i : 4 * i + 4].mean(dim=1).mean(dim=0) for i in range(n)]
    dominant = sorted(range(n), key=lambda i: -float(score[i]))[:dominant_num]
    rest = [i for i in range(n) if i not in dominant]  # raster order
    step = max(1, len(rest) // contextual_num)
    anchors = [rest[p] for p in range(0, len(rest), step)][:contextual_num]
    members = {a: [] for a in anchors}
    for m in rest:
        if m in anchors:
            continue
        cosine = [float(key[m] @ key[a] / (key[m].norm() * key[a].norm())) for a in anchors]
        members[anchors[cosine.index(max(cosine))]].append(m)
    states = {i: embeds[i] for i in dominant}
    for a in anchors:
        merged = sum((embeds[m] for m in members[a]), torch.zeros_like(embeds[a]))
        states[a] = embeds[a] + merged / max(1, len(members[a]))
    kept = sorted(states)
    return kept, torch.stack([states[i] for i in kept]), members


def test_qwen_default_is_the_authors_port_step_by_step():
    gen = torch.Generator().manual_seed(3)
    n, h, hd, d = 64, 2, 4, 6
    probs = (torch.randn(h, 4 * n, 4 * n, generator=gen) * 2).softmax(dim=-1)
    patch_keys = torch.randn(h, 4 * n, hd, generator=gen)
    embeds = torch.randn(n, d, generator=gen)
    # tokbench's statistics of the same block: received = sum over heads, mean over queries, mean over
    # the 4 patches (the port's ranking up to a constant); keys (n, u=4, h, hd)
    received = probs.sum(dim=0).mean(dim=0).view(n, 4).mean(dim=1)
    keys = patch_keys.transpose(0, 1).reshape(n, 4, h, hd)
    vision_hidden = torch.randn(n, 4, 5, generator=gen)  # must not be used by the port
    inputs = _inputs(vision_hidden, {"received": received, "keys": keys}, 16, block=-1, rows=8, embeds=embeds)
    (spec,) = VisionZip(Budget.tokens(16)).stages(QWEN_7B)
    inputs.vision_hidden = None  # the spec asks for no block outputs
    decision = VisionZip(Budget.tokens(16)).select(spec, inputs)

    # 16 of 64: the port's int(0.05 * 64) = 3 contextual, 13 dominant
    kept, states, members = _port_reference(probs, patch_keys, embeds, 13, 3)
    assert decision.keep_index.tolist() == kept
    assert decision.vision_states is None
    torch.testing.assert_close(decision.states, states)
    # the test tells the variants apart: concatenated per-patch keys assign some member elsewhere
    cat_keys = keys.mean(dim=2).flatten(1)
    anchors = sorted(members)
    moved = [
        m for a in anchors for m in members[a]
        if anchors[int((F.normalize(cat_keys[[m]], dim=-1) @ F.normalize(cat_keys[anchors], dim=-1).T).argmax())] != a
    ]  # fmt: skip
    assert moved


@pytest.mark.parametrize("budget", [1, 7, 20, 36])
def test_counts_exact_and_deterministic(budget):
    gen = torch.Generator().manual_seed(budget)
    hidden, keys = torch.randn(36, 1, 8, generator=gen), torch.randn(36, 1, 2, 4, generator=gen)
    inputs = _inputs(hidden, {"cls": torch.rand(2, 36, generator=gen), "keys": keys}, budget)
    method = VisionZip(Budget.tokens(budget))
    first, second = method.select(_spec(), inputs), method.select(_spec(), inputs)
    assert first.keep_index.numel() == method.stage_count(_spec(), inputs) == budget
    assert bool((first.keep_index[1:] > first.keep_index[:-1]).all())
    assert torch.equal(first.keep_index, second.keep_index) and torch.equal(first.vision_states, second.vision_states)


@pytest.mark.parametrize("name, n_visual", [("tiny-qwen2.5-vl", 64), ("tiny-llava", 256)])  # at 224x224
def test_end_to_end_counts_and_dominant_choice(name, n_visual):
    adapter = tiny_adapter(name)
    image, question = noise_image(224, 224), "What colour is the square?"
    with layer_lengths(adapter) as lengths:
        engine = Engine(adapter, build_method("visionzip", Budget.tokens(16)), record_kept=True)
        out = engine.generate([[image]], [question], [0], 2)
    sample = out.samples[0]
    n_text = text_length(adapter, image, question)
    assert sample.n_visual == n_visual and sample.n_kept_input == 16 and sample.kept_per_layer == [16] * adapter.n_layers
    assert lengths == [n_text + 16] * adapter.n_layers
    again = engine.generate([[image]], [question], [0], 2).samples[0]
    assert again.kept_index == sample.kept_index and again.tokens == sample.tokens

    # with no contextual tokens the kept set is the top-16 of the tower's own attention statistic
    drop_only = Engine(
        adapter, build_method("visionzip", Budget.tokens(16), {"contextual_ratio": "0"}), record_kept=True
    )
    kept = drop_only.generate([[image]], [question], [0], 1).samples[0].kept_index["vision"]
    block = adapter.info().vision_feature_layer
    with torch.no_grad():
        (visual,) = adapter.encode_images(adapter.preprocess([[image]], [question]), (), (block,))
        adapter.vision_attention([visual])
    stats = visual.extras["vision_attention"][block]
    score = stats["cls"].sum(0) if "cls" in stats else stats["received"]
    assert kept == sorted(score.topk(16).indices.tolist())


def test_qwen_port_feeds_the_merged_llm_space_states_to_layer_0():
    adapter = tiny_adapter("tiny-qwen2.5-vl")
    image, question = noise_image(224, 224, seed=1), "Where is the red square?"
    method = build_method("visionzip", Budget.tokens(16))
    (spec,) = method.stages(adapter.info())
    batch = adapter.preprocess([[image]], [question])
    with torch.no_grad():
        (visual,) = adapter.encode_images(batch, spec.vision_layers, spec.vision_attention)
        adapter.vision_attention([visual])
    n = visual.embeds.shape[0]
    (tile,) = visual.tiles
    rows, cols = tile.grid
    rc = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    inputs = StageInputs(n, n, [tile.grid], rc, 16, visual_embeds=visual.embeds, extras=dict(visual.extras))
    decision = method.select(spec, inputs)
    seen = []
    hook = adapter.layers[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs.get("hidden_states", args[0] if args else None).detach().clone()), with_kwargs=True)  # fmt: skip
    try:
        Engine(adapter, method).generate([[image]], [question], [0], 1)
    finally:
        hook.remove()
    start = int((batch.input_ids[0] == adapter.image_token_id).nonzero()[0, 0])
    torch.testing.assert_close(seen[0][0, start : start + 16], decision.states.to(seen[0].dtype))
    assert not torch.allclose(decision.states, visual.embeds[decision.keep_index])  # some tokens were merged
