"""VScan: local/global scans, merge rule, middle-layer drop, budget mapping, and both tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import layer_lengths, noise_image, text_length, tiny_adapter

from methods.vscan import VScan, default_windows, local_scan, merge_into_kept, stage_counts, window_ids
from tokbench.engine import Engine
from tokbench.pruner import Budget, ModelInfo, Stage, StageInputs, StageSpec, build_method

LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
QWEN_7B = ModelInfo("qwen2.5-vl-7b", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4, position_rows=3)


def _grid_rc(rows, cols):
    return torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)


def _tiles_rc(grids):
    """token_rc and token_tile of whole tiles ``grids`` concatenated."""
    rc = torch.cat([_grid_rc(rows, cols) for rows, cols in grids])
    tile = torch.cat([torch.full((rows * cols,), t) for t, (rows, cols) in enumerate(grids)])
    return rc, tile


def _windows(rows, cols, window):
    """Window ids of one (rows, cols) tile."""
    rc, tile = _tiles_rc([(rows, cols)])
    return window_ids(rc, tile, [(rows, cols)], [window])


def _vision_inputs(shallow, deep, embeds, budget, rows, cols, clip=True, grids=None):
    key = "cls" if clip else "received"
    stats = {1: {key: shallow[None] if clip else shallow}, 2: {key: deep[None] if clip else deep}}
    grids = grids or [(rows, cols)]
    rc, tile = _tiles_rc(grids)
    n = rc.shape[0]
    return StageInputs(
        n_visual=n,
        n_visual_original=n,
        tile_grids=grids,
        token_rc=rc,
        budget_count=budget,
        visual_embeds=embeds,
        extras={"vision_attention": stats},
        token_tile=tile,
    )


VISION = StageSpec(Stage.VISION, vision_attention=(1, 2))


def test_official_budget_mapping():
    assert stage_counts(64, 576, 0.5, 1 / 3) == (96, 32)  # official LLaVA scripts: 96 -> 32 at layer 16
    assert stage_counts(128, 576, 0.5, 1 / 3) == (192, 64)
    assert stage_counts(192, 576, 0.5, 1 / 3) == (288, 96)
    assert stage_counts(144, 1296, 0.5, 1 / 3) == (216, 72)  # Qwen --ratio 0.111: 16.7% then 1/3 of it
    assert stage_counts(576, 576, 0.5, 1 / 3) == (576, 576)  # the full budget keeps everything
    assert stage_counts(400, 576, 0.5, 1 / 3) == (576, 224)  # stage 1 capped: stage 2 restores the average


def test_stages_map_official_layers():
    vision, llm = VScan(Budget.tokens(64)).stages(LLAVA_7B)
    assert vision.vision_attention == (5, 22)  # CLS attention at CLIP block 5 (local) and -2 (global)
    assert (llm.layer, llm.attention_from, llm.attention_rope) == (15, "next", True)  # scored by layers[16]
    vision, llm = VScan(Budget.ratio(0.111)).stages(QWEN_7B)
    assert vision.vision_attention == (7, 31)
    assert (llm.layer, llm.attention_from, llm.attention_rope) == (13, "next", False)  # layers[14], no RoPE
    tiny_qwen = ModelInfo("tiny", 4, 64, 4, 4, -1, (1, 3), 4, position_rows=3)
    tiny_llava = ModelInfo("tiny", 4, 64, 4, 4, -2, (0, 1, 2, 3), 1, has_cls=True)
    assert VScan(Budget.tokens(8)).stages(tiny_qwen)[0].vision_attention == (1, 3)
    assert VScan(Budget.tokens(8)).stages(tiny_llava)[0].vision_attention == (1, 2)
    assert VScan(Budget.tokens(8)).stages(tiny_llava)[1].layer == 1


def test_capabilities_choose_the_port_settings():
    """No family name: a windowed tower gets the Qwen port's blocks, M-RoPE its unrotated scoring, and back."""
    clip_like = ModelInfo("any", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
    assert VScan(Budget.tokens(64)).stages(clip_like) == VScan(Budget.tokens(64)).stages(LLAVA_7B)
    windowed = ModelInfo("any", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4, position_rows=3)
    assert VScan(Budget.tokens(64)).stages(windowed) == VScan(Budget.tokens(64)).stages(QWEN_7B)
    # the two capabilities act separately: a windowed tower under 1-D RoPE, a full tower under M-RoPE
    vision, llm = VScan(Budget.tokens(64)).stages(ModelInfo("any", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4))
    assert vision.vision_attention == (7, 31) and llm.attention_rope
    vision, llm = VScan(Budget.tokens(64)).stages(ModelInfo("any", 28, 3584, 28, 24, -1, tuple(range(24)), 4,
                                                            position_rows=3))  # fmt: skip
    assert vision.vision_attention == (5, 23) and not llm.attention_rope
    assert VScan(Budget.tokens(64), score_rope=True).stages(QWEN_7B)[1].attention_rope
    assert build_method("vscan", Budget.tokens(64), {"score_rope": "false"}).stages(LLAVA_7B)[1].attention_rope is False


def test_local_scan_keeps_one_winner_per_window():
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(64, generator=gen)
    windows = _windows(8, 8, 2)  # 16 windows of 2x2
    picked = local_scan(score, windows, 16)
    assert sorted(windows[picked].tolist()) == list(range(16))
    expected = [int(torch.nonzero(windows == w)[score[windows == w].argmax()]) for w in range(16)]
    assert sorted(picked.tolist()) == sorted(expected)
    picked2 = local_scan(score, windows, 32)  # two per window: each window's top two
    assert torch.bincount(windows[picked2], minlength=16).tolist() == [2] * 16


def test_local_scan_caps_windows_when_counts_do_not_divide():
    score = torch.zeros(64)
    score[:8] = torch.arange(8, 0, -1).float()  # the eight best tokens sit in the first row
    windows = _windows(8, 8, 4)  # 4 windows; 6 tokens -> at most 2 per window
    picked = local_scan(score, windows, 6)
    assert picked.numel() == 6
    assert torch.bincount(windows[picked], minlength=4).max() <= 2
    assert {0, 1, 4, 5} <= set(picked.tolist())  # the top two of each of the first-row windows


def test_window_ids_leftover_rows_join_last_window():
    ids = _windows(5, 4, 2)  # row 4 is left over: joins window row 1
    assert ids.view(5, 4)[4].tolist() == ids.view(5, 4)[3].tolist() == [2, 2, 3, 3]


def test_windows_never_straddle_tiles():
    grids = [(5, 4), (3, 6), (2, 2)]  # different grids; 2-token windows: 2x2, 1x3 and 1x1 windows
    rc, tile = _tiles_rc(grids)
    ids = window_ids(rc, tile, grids, [2, 2, 2])
    assert ids.unique().tolist() == list(range(4 + 3 + 1))
    for w in ids.unique():
        assert tile[ids == w].unique().numel() == 1  # every window lies in one tile
    assert ids[tile == 0].max() == 3 and ids[tile == 1].unique().tolist() == [4, 5, 6] and ids[tile == 2].unique() == 7
    # the tile comes from token_tile, not from row/col: a tile whose (0, 0) token is gone stays apart
    rest = torch.arange(rc.shape[0]) != 20  # token 20 = (0, 0) of tile 1
    again = window_ids(rc[rest], tile[rest], grids, [2, 2, 2])
    assert torch.equal(again, ids[rest])


def test_default_window_follows_each_tile_grid():
    assert default_windows([(24, 24), (8, 12), (2, 3)], cls=True) == [6, 2, 1]  # LLaVA port: 4x4 windows per grid
    assert default_windows([(24, 24), (8, 12)], cls=False) == [4, 4]  # Qwen port: 4-token windows
    gen = torch.Generator().manual_seed(3)
    grids = [(8, 8), (4, 4)]  # CLS tower: windows of side 2 and 1 -> 16 + 16 windows
    shallow, deep = torch.rand(80, generator=gen), torch.rand(80, generator=gen)
    method = VScan(Budget.tokens(30))
    inputs = _vision_inputs(shallow, deep, torch.randn(80, 4, generator=gen), 30, 0, 0, grids=grids)
    keep = method.select(VISION, inputs).keep_index
    t1 = method.stage_count(VISION, inputs)
    rc, tile = _tiles_rc(grids)
    local = local_scan(shallow, window_ids(rc, tile, grids, [2, 1]), t1 // 2)
    rest = torch.ones(80, dtype=torch.bool)
    rest[local] = False
    top_rest = torch.nonzero(rest)[:, 0][deep[rest].topk(t1 - local.numel()).indices]
    assert keep.tolist() == sorted(local.tolist() + top_rest.tolist()) and keep.numel() == t1 == 45


def test_global_scan_excludes_local_picks_and_counts_are_exact():
    gen = torch.Generator().manual_seed(1)
    shallow = torch.rand(64, generator=gen)
    deep = shallow.clone()  # the same ranking: global would repeat the local winners if not excluded
    embeds = torch.randn(64, 6, generator=gen)
    method = VScan(Budget.tokens(8), window=2)  # T1 = 12: 6 local (one in 6 of 16 windows), 6 global
    inputs = _vision_inputs(shallow, deep, embeds, 8, 8, 8)
    decision = method.select(VISION, inputs)
    assert method.stage_count(VISION, inputs) == decision.keep_index.numel() == 12
    assert decision.keep_index.unique().numel() == 12
    local = local_scan(shallow, _windows(8, 8, 2), 6)
    rest = torch.ones(64, dtype=torch.bool)
    rest[local] = False
    top_rest = torch.nonzero(rest)[:, 0][deep[rest].topk(6).indices]
    assert sorted(decision.keep_index.tolist()) == sorted(local.tolist() + top_rest.tolist())


def test_merge_rule_on_hand_made_tokens():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    states = torch.stack([2 * e1, e1 + 0.1 * e2, 5 * e2, 3 * e1, 0.2 * e1 + e2, 7 * e2])  # (6, 2)
    merged = merge_into_kept(states, torch.tensor([0, 2]))
    torch.testing.assert_close(merged[0], (states[0] + states[1] + states[3]) / 3)
    torch.testing.assert_close(merged[1], (states[2] + states[4] + states[5]) / 3)
    lonely = merge_into_kept(torch.stack([e1, e2, 3 * e1]), torch.tensor([0, 1]))
    torch.testing.assert_close(lonely[1], e2)  # no members: unchanged
    torch.testing.assert_close(lonely[0], 2 * e1)  # (e1 + 3 e1) / 2


def test_llm_stage_keeps_top_mean_head_attention():
    attention = torch.zeros(2, 24)
    attention[0, [3, 10, 20]] = 0.9  # planted in one head; the heads are averaged
    attention[1, 7] = 0.2
    inputs = StageInputs(24, 64, [(8, 8)], _grid_rc(8, 8)[:24], 16, text_attention=attention)
    method = VScan(Budget.tokens(16))
    spec = method.stages(ModelInfo("t", 4, 64, 4, 4, -2, (0, 1, 2, 3), 1, has_cls=True))[1]
    assert method.stage_count(spec, inputs) == 8  # T1 = 24, T2 = 8: average 16 over the layers
    kept = method.select(spec, inputs).keep_index.tolist()
    assert len(kept) == 8 and {3, 7, 10, 20} <= set(kept) and kept == sorted(kept)


def test_deterministic():
    gen = torch.Generator().manual_seed(2)
    inputs = _vision_inputs(torch.rand(64, generator=gen), torch.rand(64, generator=gen), torch.randn(64, 4), 10, 8, 8)
    method = VScan(Budget.tokens(10))
    a, b = method.select(VISION, inputs), method.select(VISION, inputs)
    assert torch.equal(a.keep_index, b.keep_index) and torch.equal(a.states, b.states)


@pytest.mark.parametrize("name, n_visual", [("tiny-qwen2.5-vl", 64), ("tiny-llava", 256)])  # at 224x224
def test_end_to_end_counts_at_both_stages(name, n_visual):
    adapter = tiny_adapter(name)
    image, question = noise_image(224, 224), "Where is the square?"
    with layer_lengths(adapter) as lengths:
        engine = Engine(adapter, build_method("vscan", Budget.tokens(16)), record_kept=True)
        out = engine.generate([[image]], [question], [0], 2)
    sample = out.samples[0]
    n_text = text_length(adapter, image, question)
    assert sample.n_visual == n_visual and sample.n_kept_input == 24
    assert sample.kept_per_layer == [24, 24, 8, 8]  # layer-averaged 16 = the budget
    assert lengths == [n_text + k for k in sample.kept_per_layer]
    assert sum(sample.kept_per_layer) / len(sample.kept_per_layer) == 16
    assert set(sample.kept_index["llm(1)"]) <= set(sample.kept_index["vision"])
    again = engine.generate([[image]], [question], [0], 2).samples[0]
    assert again.kept_index == sample.kept_index and again.tokens == sample.tokens


def test_end_to_end_two_images_in_one_sample():
    adapter = tiny_adapter("tiny-qwen2.5-vl")
    out = Engine(adapter, build_method("vscan", Budget.ratio(0.25))).generate(
        [[noise_image(224, 224), noise_image(336, 224, seed=1)]], ["Compare them."], [0], 1
    )
    sample = out.samples[0]
    t1, t2 = stage_counts(round(0.25 * sample.n_visual), sample.n_visual, 0.5, 1 / 3)
    assert sample.kept_per_layer == [t1, t1, t2, t2]
