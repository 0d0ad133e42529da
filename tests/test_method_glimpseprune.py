"""GlimpsePrune: official checkpoint layout, keep rule, fixed-ratio mode, VIP structure, tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import noise_image, tiny_adapter

from methods.glimpse_vip import VIP, GlimpseConfig, GlimpseModules
from methods.glimpseprune import GlimpsePrune, default_config, keep_dynamic, top_tokens
from tokbench.engine import Engine
from tokbench.pruner import Budget, ModelInfo, Stage, StageInputs, build_method

QWEN_7B = ModelInfo("Qwen/Qwen2.5-VL-7B-Instruct", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4,
                    position_rows=3)  # fmt: skip
QWEN_3B = ModelInfo("qwen2.5-vl-3b", 36, 2048, 16, 32, -1, (7, 15, 23, 31), 4, position_rows=3)
LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
LLAVA_13B = ModelInfo("llava-hf/llava-1.5-13b-hf", 40, 5120, 40, 24, -2, tuple(range(24)), 1, has_cls=True)
SMALL = ModelInfo("small", 6, 32, 4, 4, -1, (1, 3), 4, position_rows=3)

# Parameter names of the official AttnFuserV1 with 2 vision layers, no deep supervision.
FUSER_KEYS = {"attn_in_proj.weight", "attn_in_proj.bias", "attn_out_projs.1.weight", "attn_out_projs.1.bias"} | {
    f"{part}.{i}.{name}"
    for i in range(2)
    for part, names in [
        ("cond_in_projs", ["weight", "bias"]),
        ("layers", ["norm1.weight", "norm2.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                    "attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight",
                    "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"]),
    ]
    for name in names
}


def _small_config(**changes) -> GlimpseConfig:
    values = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 6, "vision_hidden_size": 24,
              "reduce_layer": 3, "selected_layers": (3,), "le_layers": tuple(range(6)),
              "selected_visual_layers": (3, 1), "attn_fuse_size": 16, "visual_cond_size": 8, "attn_fuse_num_heads": 2,
              "has_cls": False, "patches_per_token": 4, "vision_windowed": True}  # SMALL's capabilities
    values.update(changes)
    return GlimpseConfig(**values)


def _stage_inputs(n_side=4, layers=1, heads=4, d_v=24, seed=0, budget_count=None, blocks=(3, 1)):
    g = torch.Generator().manual_seed(seed)
    n = n_side * n_side
    rc = torch.stack(torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij"), -1).reshape(-1, 2)
    return StageInputs(
        n_visual=n, n_visual_original=n, tile_grids=[(n_side, n_side)], token_rc=rc, budget_count=budget_count,
        vision_hidden={b: torch.randn(n, 4, d_v, generator=g) for b in blocks},
        extras={"probe_logits": torch.randn(layers, heads, n, generator=g)},
    )


def _write_official(directory, modules: GlimpseModules, nested_text=False):
    """What the official save_new_modules writes: the full model config + a dict of state dicts."""
    cfg = modules.cfg
    gp_keys = {"selected_layers": list(cfg.selected_layers), "reduce_layer": cfg.reduce_layer,
               "le_layers": list(cfg.le_layers), "selected_visual_layers": list(cfg.selected_visual_layers),
               "attn_fuse_size": cfg.attn_fuse_size, "visual_cond_size": cfg.visual_cond_size,
               "attn_fuse_num_heads": cfg.attn_fuse_num_heads, "attn_fuse_type": "AttnFuserV1",
               "attn_fuse_hidden_act": "silu", "attn_fuse_global": True, "use_attention_logits": True,
               "deep_supervision": False, "ori_attn_supervision": False, "le_length": 1, "le_norm_type": "rmsnorm",
               "le_dropout_prob": 0.0, "reduce_threshold": 0.5, "min_remain_num": 1, "max_remain_ratio": None,
               "anchor_positions": [], "use_ref_masks": False, "use_zero_masks": False}
    text = {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "num_hidden_layers": cfg.num_hidden_layers, "rms_norm_eps": cfg.rms_norm_eps, "vocab_size": 100}
    raw = {"model_type": "qwen2_5_vl_gp", "architectures": ["Qwen2_5_VL_GP_ForConditionalGeneration"],
           "vision_config": {"hidden_size": 24, "depth": 4}, **gp_keys}
    raw.update({"text_config": text} if nested_text else text)
    (directory / "config.json").write_text(json.dumps(raw))
    torch.save({"attn_fuser": modules.attn_fuser.state_dict(),
                "learnable_embeddings": modules.learnable_embeddings.data,
                "le_proj": modules.le_proj.state_dict(), "le_norm": modules.le_norm.state_dict()},
               directory / "new_modules_gp.pt")


@pytest.mark.parametrize("nested_text", [False, True])
def test_official_checkpoint_round_trips(tmp_path, nested_text):
    modules = GlimpseModules(_small_config()).init_untrained(7)
    assert set(modules.attn_fuser.state_dict()) == FUSER_KEYS  # the official parameter names
    _write_official(tmp_path, modules, nested_text)
    loaded = GlimpseModules.load(tmp_path)
    assert loaded.cfg == modules.cfg
    for (name, a), (_, b) in zip(modules.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    inputs = _stage_inputs()
    conds = [inputs.vision_hidden[b].mean(1) for b in (3, 1)]
    feats = inputs.extras["probe_logits"].permute(2, 0, 1).reshape(16, -1)
    ids = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        rc = inputs.token_rc
        assert torch.equal(modules.attn_fuser(feats, conds, rc, ids), loaded.attn_fuser(feats, conds, rc, ids))
    # ...and the method's save_weights writes the same layout back
    method = GlimpsePrune(None, weights=str(tmp_path))
    method.stages(SMALL)
    method.save_weights(tmp_path / "again")
    state = torch.load(tmp_path / "again" / "new_modules_gp.pt", weights_only=True)
    assert set(state) == {"attn_fuser", "learnable_embeddings", "le_proj", "le_norm"}
    assert set(state["attn_fuser"]) == FUSER_KEYS and state["learnable_embeddings"].shape == (6, 1, 32)
    again = GlimpseModules.load(tmp_path / "again")
    assert torch.equal(again.layer_vectors(), modules.layer_vectors())


def test_probe_carries_the_effective_per_layer_embeddings(tmp_path):
    modules = GlimpseModules(_small_config()).init_untrained(3)
    _write_official(tmp_path, modules)
    method = GlimpsePrune(None, weights=str(tmp_path))
    (spec,) = method.stages(SMALL)
    assert (spec.stage, spec.layer, spec.vision_layers) == (Stage.GLIMPSE, 3, (3, 1))
    probe = method.probe(SMALL)
    with torch.no_grad():
        effective = modules.le_norm(modules.le_proj(modules.learnable_embeddings[:, 0]))  # (6, 32)
    torch.testing.assert_close(probe.token_embed, effective[0])
    assert probe.layer_embeds.shape == (4, 32) and torch.equal(probe.layer_embeds[0], torch.zeros(32))
    torch.testing.assert_close(probe.layer_embeds[1:], effective[1:4])
    assert probe.attention_layers == (3,)


def test_dynamic_rule_threshold_cap_and_minimum():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 0.1, -0.2, 3.0, -5.0, 1.0])
    assert keep_dynamic(logits, 0.5, None, 1).tolist() == [0, 2, 4, 5, 7, 9]  # sigmoid > 0.5 <=> logit > 0
    assert keep_dynamic(logits, 0.5, 0.3, 1).tolist() == [0, 4, 7]  # 6/10 > 0.3: exactly int(0.3 * 10) = top 3
    assert keep_dynamic(logits, 0.5, 0.6, 1).tolist() == [0, 2, 4, 5, 7, 9]  # at the cap: unchanged
    assert keep_dynamic(logits, 0.99, None, 1).tolist() == [4]  # nothing passes: the best one
    assert keep_dynamic(logits, 0.99, None, 2).tolist() == [4, 7]
    assert keep_dynamic(-logits.abs() - 1, 0.5, 0.05, 1).numel() == 1  # cap rounds to 0, the minimum wins
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(200, generator=g) * 3
        kept = keep_dynamic(x, 0.5, 0.1, 1)
        assert 1 <= kept.numel() <= 20 and kept.tolist() == sorted(set(kept.tolist()))


def test_ties_go_to_the_lower_token_index():
    assert top_tokens(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 2]  # torch.topk: [2, 4]
    saturated = torch.zeros(300)
    saturated[::3] = 7.0  # 100 tokens whose bf16 sigmoid is exactly 1.0
    assert top_tokens(saturated, 5).tolist() == [0, 3, 6, 9, 12]
    # the cap keeps the first tied tokens; a higher logit still wins over any tie
    saturated[200] = 7.5
    assert keep_dynamic(saturated, 0.5, 0.02, 1).tolist() == [0, 3, 6, 9, 12, 200]  # int(0.02 * 300) = 6
    assert keep_dynamic(-saturated - 1, 0.5, None, 2).tolist() == [1, 2]  # the minimum, among equal logits
    # the fixed-ratio mode ranks the same way
    method = GlimpsePrune(Budget.tokens(4), allow_untrained=True)
    (spec,) = method.stages(SMALL)
    inputs = _stage_inputs(budget_count=4)
    tied = torch.tensor([5.0, 1.0, 5.0, 2.0] * 4)
    method.vip_logits = lambda spec, inputs: tied
    assert method.select(spec, inputs).keep_index.tolist() == [0, 2, 4, 6]


def test_budget_modes_and_fixed_ratio_is_exact():
    full = GlimpsePrune(None, allow_untrained=True)
    (spec,) = full.stages(SMALL)
    inputs = _stage_inputs(n_side=6, budget_count=36, d_v=24)
    assert full.stage_count(spec, inputs) is None and full.dynamic_cap() is None  # official default: no cap
    assert GlimpsePrune(Budget.dynamic(0.111), allow_untrained=True, max_remain_ratio=0.5).dynamic_cap() == 0.111
    capped = GlimpsePrune(None, allow_untrained=True, max_remain_ratio=0.2)
    capped.stages(SMALL)
    assert 1 <= capped.select(spec, inputs).keep_index.numel() <= int(0.2 * 36)
    fixed = GlimpsePrune(Budget.tokens(5), allow_untrained=True)
    fixed.stages(SMALL)
    inputs.budget_count = 5
    assert fixed.stage_count(spec, inputs) == 5
    decision = fixed.select(spec, inputs)
    assert decision.keep_index.tolist() == decision.scores.topk(5).indices.sort().values.tolist()
    again = GlimpsePrune(Budget.tokens(5), allow_untrained=True)
    again.stages(SMALL)
    assert torch.equal(again.select(spec, inputs).scores, decision.scores)  # seeded: deterministic


def test_vip_rope_is_rows_then_columns_duplicated():
    vip = VIP(_small_config())  # head dim (16 + 8) / 2 = 12: 3 row frequencies, 3 column ones, twice
    cos, sin = vip.rope(torch.tensor([[2, 5]]))
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 6, 2).float() / 6)
    angles = torch.cat([2 * inv_freq, 5 * inv_freq])
    torch.testing.assert_close(cos[0], torch.cat([angles, angles]).cos())
    torch.testing.assert_close(sin[0], torch.cat([angles, angles]).sin())


def test_vip_attends_within_each_image_and_window():
    torch.manual_seed(0)
    vip = VIP(_small_config(vision_hidden_size=24)).eval()
    rc = torch.tensor([[r, c] for r in range(8) for c in range(8)] + [[r, c] for r in range(4) for c in range(4)])
    ids = torch.tensor([0] * 64 + [1] * 16)
    feats, conds = torch.randn(80, 4), [torch.randn(80, 24), torch.randn(80, 24)]
    with torch.no_grad():
        base = vip(feats, conds, rc, ids)
        other = [c.clone() for c in conds]
        other[0][64:] += 5  # change the second image only
        assert torch.allclose(vip(feats, other, rc, ids)[:64], base[:64], atol=1e-6)
        assert not torch.allclose(vip(feats, other, rc, ids)[64:], base[64:])
        windowed = VIP(_small_config(attn_fuse_global=False))
        windowed.load_state_dict(vip.state_dict())
        first = windowed(feats, conds, rc, ids)
        moved = [c.clone() for c in conds]
        moved[0][4:8] += 5  # tokens of window (0, 1) of image 0; window (0, 0) is rows 0-3, cols 0-3
        inside = (rc[:64] // 4 == 0).all(1)
        assert torch.allclose(windowed(feats, moved, rc, ids)[:64][inside], first[:64][inside], atol=1e-6)


def test_llava_uses_log_softmax_features():
    """Official LLaVA features are log-probabilities: a per-head constant shift must not matter."""
    inputs = _stage_inputs(n_side=4, d_v=24)
    shifted = _stage_inputs(n_side=4, d_v=24)
    shift = torch.arange(4.0)[None, :, None]  # a per-head constant over every key
    shifted.extras["probe_logits"] = inputs.extras["probe_logits"] + shift
    # the normaliser runs over all keys (text too), so it exceeds the image-only logsumexp
    inputs.extras["probe_logsumexp"] = inputs.extras["probe_logits"].logsumexp(-1) + 0.7
    shifted.extras["probe_logsumexp"] = inputs.extras["probe_logsumexp"] + shift[..., 0]
    for has_cls, invariant in [(True, True), (False, False)]:  # the LLaVA port with a CLS tower, else Qwen's
        model = ModelInfo("small", 6, 32, 4, 5, -2, tuple(range(5)), 1, has_cls=has_cls)
        method = GlimpsePrune(None, allow_untrained=True)
        (spec,) = method.stages(model)
        spec_inputs = {b: inputs.vision_hidden[3] for b in spec.vision_layers}
        inputs.vision_hidden = shifted.vision_hidden = spec_inputs
        same = torch.allclose(method.vip_logits(spec, inputs), method.vip_logits(spec, shifted), atol=1e-5)
        assert same == invariant


def test_capabilities_choose_the_port_settings():
    """No family name: a CLS tower gets the LLaVA port's settings, a windowed one the Qwen port's blocks."""
    llava, qwen = default_config(LLAVA_7B), default_config(QWEN_7B)
    assert (llava.use_attention_logits, llava.selected_visual_layers, llava.vision_blocks()) == (
        False, (23, 17, 11, 5), (22, 16, 10, 4))  # CLIP hidden_states indices, log-softmax features
    assert (qwen.use_attention_logits, qwen.selected_visual_layers, qwen.vision_blocks()) == (
        True, (31, 23, 15, 7), (31, 23, 15, 7))  # full-attention ViT blocks, raw logits
    renamed = ModelInfo("some-vlm", 32, 4096, 32, 24, -2, tuple(range(24)), 1, has_cls=True)
    cfg = default_config(renamed)
    assert (cfg.use_attention_logits, cfg.vision_blocks()) == (False, (22, 16, 10, 4))
    assert cfg.reduce_layer == 21  # 2/3 of 32, not looked up: K comes from the name table only
    assert default_config(ModelInfo("some-vlm", 28, 3584, 28, 32, -1, (7, 15, 23, 31), 4)).reduce_layer == 19
    # neither a CLS token nor windows (a Qwen3-VL-like tower): four blocks down from the feature block, raw logits
    plain = default_config(ModelInfo("plain", 28, 2048, 16, 24, -1, tuple(range(24)), 4, position_rows=3))
    assert (plain.use_attention_logits, plain.selected_visual_layers, plain.vision_blocks()) == (
        True, (23, 17, 11, 5), (23, 17, 11, 5))
    assert (plain.has_cls, plain.patches_per_token, plain.vision_windowed) == (False, 4, False)


def test_official_llava_checkpoint_reads_the_llava_port_capabilities(tmp_path):
    cfg = default_config(ModelInfo("llava-like", 6, 32, 4, 5, -2, tuple(range(5)), 1, vision_hidden_size=24,
                                   has_cls=True))  # fmt: skip
    modules = GlimpseModules(cfg).init_untrained(2)
    modules.save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("has_cls", "patches_per_token", "vision_windowed"):  # the official file has model_type only
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "llava_llama_gp"}))
    loaded = GlimpseModules.load(tmp_path)
    assert loaded.cfg == cfg and loaded.cfg.vision_blocks() == (3, 2, 1, 0)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "mystery"}))
    with pytest.raises(ValueError, match="not an official GlimpsePrune one"):
        GlimpseModules.load(tmp_path)


@pytest.mark.parametrize(("base_type", "written"), [("qwen2_5_vl", "qwen2_5_vl_gp"), ("llava", "llava_llama_gp"),
                                                     ("qwen3_vl", "qwen3_vl_gp"), ("llava_llama_gp", "llava_llama_gp")])
def test_written_checkpoints_carry_capabilities_and_the_callers_model_type(tmp_path, base_type, written):
    method = GlimpsePrune(None, allow_untrained=True)
    method.stages(SMALL)
    method.save_weights(tmp_path / "a", model_type=base_type)
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    assert raw["model_type"] == written
    assert (raw["has_cls"], raw["patches_per_token"], raw["vision_windowed"]) == (False, 4, True)
    loaded = GlimpseModules.load(tmp_path / "a")
    assert loaded.cfg == method._modules.cfg
    loaded.save(tmp_path / "b")  # the model_type read is kept
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == written
    # a base config (the trainer's model.config.to_dict()) names the base model_type when none is passed
    width = method._modules.cfg.vision_hidden_size
    method._modules.base_config = {"model_type": base_type, "vision_config": {"hidden_size": width}}
    method.save_weights(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == written


def test_untyped_checkpoint_loads_from_its_capability_keys(tmp_path):
    method = GlimpsePrune(None, allow_untrained=True)
    method.stages(SMALL)
    method.save_weights(tmp_path)  # no base config, no model_type given: none written
    assert "model_type" not in json.loads((tmp_path / "config.json").read_text())
    assert GlimpseModules.load(tmp_path).cfg == method._modules.cfg


def test_weights_for_other_capabilities_are_refused(tmp_path):
    GlimpseModules(_small_config()).init_untrained(1).save(tmp_path, model_type="qwen2_5_vl")
    same_sizes_with_cls = ModelInfo("small", 6, 32, 4, 4, -1, tuple(range(4)), 1, has_cls=True)
    with pytest.raises(ValueError, match="has_cls, patches_per_token, vision_windowed"):
        GlimpsePrune(None, weights=str(tmp_path)).stages(same_sizes_with_cls)
    assert GlimpsePrune(None, weights=str(tmp_path)).stages(SMALL)[0].vision_layers == (3, 1)


def _tile_inputs(grids, seed=0, layers=1, heads=4, d_v=24, blocks=(3, 1)):
    g = torch.Generator().manual_seed(seed)
    rc = torch.cat([torch.stack(torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij"), -1).reshape(-1, 2)
                    for r, c in grids])  # fmt: skip
    tile = torch.cat([torch.full((r * c,), t) for t, (r, c) in enumerate(grids)])
    n = rc.shape[0]
    return StageInputs(
        n_visual=n, n_visual_original=n, tile_grids=grids, token_rc=rc, budget_count=None,
        vision_hidden={b: torch.randn(n, 4, d_v, generator=g) for b in blocks},
        extras={"probe_logits": torch.randn(layers, heads, n, generator=g)}, token_tile=tile,
    )


def _subset(inputs: StageInputs, keep: torch.Tensor, grids) -> StageInputs:
    return StageInputs(
        n_visual=int(keep.numel()), n_visual_original=inputs.n_visual_original, tile_grids=grids,
        token_rc=inputs.token_rc[keep], budget_count=None,
        vision_hidden={b: v[keep] for b, v in inputs.vision_hidden.items()},
        extras={"probe_logits": inputs.extras["probe_logits"][..., keep]},
        token_tile=None if inputs.token_tile is None else inputs.token_tile[keep] - int(inputs.token_tile[keep].min()),
    )


@pytest.mark.parametrize("attn_fuse_global", [True, False])
def test_vip_runs_each_tile_on_its_own(tmp_path, attn_fuse_global):
    """Two tiles of different grids in one sample give each tile the logits it gets alone (attention, windows
    and RoPE per tile), and the tile comes from token_tile, not from where row/col restart."""
    modules = GlimpseModules(_small_config(attn_fuse_global=attn_fuse_global)).init_untrained(4)
    modules.save(tmp_path, model_type="qwen2_5_vl")
    method = GlimpsePrune(None, weights=str(tmp_path))
    (spec,) = method.stages(SMALL)
    grids = [(8, 8), (4, 6)]
    inputs = _tile_inputs(grids)
    both = method.vip_logits(spec, inputs)
    first, second = torch.arange(64), torch.arange(64, 88)
    alone = [method.vip_logits(spec, _subset(inputs, first, grids[:1])),
             method.vip_logits(spec, _subset(inputs, second, grids[1:]))]  # fmt: skip
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=0)
    # tile 1 without its (0, 0) token: still its own group, so tile 0's logits do not move
    rest = torch.cat([first, second[1:]])
    dropped = _subset(inputs, rest, grids)
    dropped.token_tile = inputs.token_tile[rest]
    torch.testing.assert_close(method.vip_logits(spec, dropped)[:64], both[:64], atol=1e-5, rtol=0)
    one_group = _subset(inputs, torch.arange(88), grids)
    one_group.token_tile = None  # every token in tile 0: the tiles now see each other
    assert not torch.allclose(method.vip_logits(spec, one_group)[:64], both[:64], atol=1e-4)


def test_official_layers_and_missing_weights():
    for model, layer, blocks in [(QWEN_7B, 18, (31, 23, 15, 7)), (QWEN_3B, 23, (31, 23, 15, 7)),
                                 (LLAVA_7B, 21, (22, 16, 10, 4)), (LLAVA_13B, 26, (22, 16, 10, 4))]:
        (spec,) = GlimpsePrune(None, allow_untrained=True).stages(model)
        assert (spec.layer, spec.vision_layers) == (layer, blocks)
    with pytest.raises(ValueError, match="--method-arg weights=PATH"):
        build_method("glimpseprune", None).stages(SMALL)
    with pytest.raises(ValueError, match="ashun989/GlimpsePrune_Qwen2.5-VL-7B-Instruct.*weights=PATH"):
        build_method("glimpseprune", None).stages(QWEN_7B)  # offline: the default hub id is not cached


QUESTIONS = ["What colour is the square?", "Where is it?"]


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_end_to_end_keeps_only_selected_tokens_everywhere(name):
    adapter = tiny_adapter(name)
    images = [[noise_image(448, 336, seed=0)], [noise_image(224, 224, seed=1)]]
    args = {"allow_untrained": "true"}
    for budget in (Budget.dynamic(0.3), Budget.ratio(0.25), Budget.full()):
        method = build_method("glimpseprune", budget, args)
        out = Engine(adapter, method, record_kept=True).generate(images, QUESTIONS, [0, 1], 4)
        repeat = Engine(adapter, build_method("glimpseprune", budget, args), record_kept=True).generate(
            images, QUESTIONS, [0, 1], 4
        )
        layer = method.stages(adapter.info())[0].layer
        assert layer == 2  # min(round(2 * 4 / 3), 4 - 2)
        for sample, again in zip(out.samples, repeat.samples):
            n = sample.n_visual
            kept = sample.kept_per_layer[-1]
            assert sample.kept_per_layer == [n] * (layer + 1) + [kept] * (adapter.n_layers - layer - 1)
            text = sample.seq_len_per_layer[0] - n
            assert sample.kv_len_per_layer == [text + kept] * adapter.n_layers  # 0..K compacted too, no probe
            assert len(sample.kept_index["glimpse(2)"]) == kept
            if budget.kind == "dynamic":
                assert 1 <= kept <= int(0.3 * n)
            elif budget == Budget.ratio(0.25):
                assert kept == round(0.25 * n)
            assert sample.tokens == again.tokens and sample.kept_index == again.kept_index


def test_grouped_attention_equals_masked_attention():
    """The VIP's within-group attention equals SDPA with the explicit (n, n) group mask, without building it."""
    import torch
    import torch.nn.functional as F

    from methods.glimpse_vip import grouped_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 37, 8, generator=g), torch.randn(2, 37, 8, generator=g)
    v = torch.randn(2, 37, 5, generator=g)
    for group in (torch.zeros(37, dtype=torch.long), torch.randint(0, 6, (37,), generator=g)):
        mask = group[:, None] == group[None, :]
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
        assert torch.allclose(grouped_attention(q, k, v, group), expected, atol=1e-5)
