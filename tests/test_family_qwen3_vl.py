"""The Qwen3-VL family adapter (`tokbench/models/families/qwen3_vl.py`) against the model's own forward.

A tiny Qwen3-VL (built offline by the adapter, loaded back with eager attention in float32) runs a batch of
two left-padded samples, one with one image and one with two images of other sizes. What the adapter
computes is compared with what the HF model computes or feeds its language model: the visual tokens and
DeepStack features, the vision blocks' attention, the token grids, the M-RoPE ids, the attention rows from
the adapter's query/key projections, and a layer-by-layer prefill with `after_layer` (DeepStack). The
shipped real-size configs are checked against the released parameter counts.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import noise_image

from tokbench.models.random_weights import CONFIG_DIR

FAMILY = "tokbench.models.families.qwen3_vl"
# Parameter counts of the released checkpoints (HF hub safetensors totals; docs in each config's _source)
PUBLISHED = {"qwen3-vl-2b": 2_127_532_032, "qwen3-vl-4b": 4_437_815_808, "qwen3-vl-8b": 8_767_123_696}


# --- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family():
    return importlib.import_module(FAMILY)


@pytest.fixture(scope="module")
def adapter(family, tmp_path_factory):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-qwen3-vl") / "ckpt"
    (name, kwargs), = family.ADAPTER.tiny_models.items()
    family.ADAPTER.build_tiny(path, seed=0, **kwargs)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return family.ADAPTER(model.eval(), AutoProcessor.from_pretrained(path), name)


IMAGES = [[noise_image(300, 200, seed=1)], [noise_image(256, 256, seed=2), noise_image(200, 330, seed=3)]]
QUESTIONS = ["What is it?", "Which of the two images is brighter, and why?"]


@pytest.fixture(scope="module")
def batch(adapter):
    return adapter.preprocess(IMAGES, QUESTIONS)


def _forward_inputs(batch) -> dict:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.model_inputs}


def _llm_inputs(adapter, batch) -> dict:
    """The keyword arguments the model's own forward hands its language model."""
    seen = {}

    def keep(module, args, kwargs):
        seen.update(kwargs)

    handle = adapter.text_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**_forward_inputs(batch))
    finally:
        handle.remove()
    return seen


def _per_sample(visual: list) -> list[list]:
    sizes = [len(sample) for sample in IMAGES]
    return [visual[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]


# --- (a) token grids, visual tokens, DeepStack features, vision blocks ---------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (100, 37), (300, 200), (512, 512), (1000, 700), (33, 900), (513, 250)])
def test_token_tiles_are_the_processors_grid(adapter, size):
    image = noise_image(*size)
    _, h, w = adapter.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    merge = adapter.processor.image_processor.merge_size
    (tile,) = adapter.token_tiles(image)
    assert (tile.grid, tile.box) == ((h // merge, w // merge), (0.0, 0.0, float(size[0]), float(size[1])))
    n_tokens = int((adapter.preprocess([[image]], ["q"]).input_ids == adapter.image_token_id).sum())
    assert n_tokens == h * w // merge**2


@pytest.mark.parametrize("budget", [4, 30, 100])
def test_resize_to_tokens_meets_the_budget(adapter, budget):
    image = noise_image(700, 450)
    resized = adapter.resize_to_tokens(image, budget)
    _, h, w = adapter.processor.image_processor(images=[resized], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert budget // 2 <= h * w // 4 <= budget


def test_max_pixels_caps_the_grid(adapter, monkeypatch):
    """--max-pixels caps large images; token_tiles follows the processor."""
    monkeypatch.setattr(adapter.processor.image_processor, "size", dict(adapter.processor.image_processor.size))
    adapter.configure_processor(128 * 128)
    image = noise_image(700, 450)
    _, h, w = adapter.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert h * w * 16 * 16 <= 128 * 128
    assert adapter.token_tiles(image)[0].grid == (h // 2, w // 2)


def test_visual_tokens_and_deepstack_are_what_the_model_feeds_its_llm(adapter, batch):
    with torch.no_grad():
        visual = adapter.encode_images(batch)
    fed = _llm_inputs(adapter, batch)
    assert [v.tiles for v in visual] == [adapter.token_tiles(image) for sample in IMAGES for image in sample]
    assert [v.embeds.shape[0] for v in visual] == [t.grid[0] * t.grid[1] for v in visual for t in v.tiles]
    mask = fed["visual_pos_masks"]
    torch.testing.assert_close(torch.cat([v.embeds for v in visual]), fed["inputs_embeds"][mask], rtol=0, atol=0)
    levels = fed["deepstack_visual_embeds"]
    assert len(levels) == len(adapter.model.config.vision_config.deepstack_visual_indexes) == 2
    for level, expected in enumerate(levels):
        torch.testing.assert_close(torch.cat([v.extras["deepstack"][level] for v in visual]), expected, rtol=0, atol=0)


def test_block_states_come_per_token_in_the_visual_tokens_order(adapter, batch):
    """Any block's captured states (n, 4, d_v) are the merged tokens' patches in the embeds' order: the merger on
    the last block gives the embeds, each DeepStack merger on its block gives that level's features."""
    tower = adapter.vision_tower
    indexes = list(tower.deepstack_visual_indexes)
    with torch.no_grad():
        visual = adapter.encode_images(batch, vision_layers=(-1, *indexes))
        for tokens in visual:
            torch.testing.assert_close(adapter.project_vision(tokens.vision_hidden[-1]), tokens.embeds)
            for level, block in enumerate(indexes):
                states = tokens.vision_hidden[block]
                assert states.shape == (tokens.embeds.shape[0], 4, tower.config.hidden_size)
                merged = tower.deepstack_merger_list[level](states.reshape(-1, states.shape[-1]))
                torch.testing.assert_close(merged, tokens.extras["deepstack"][level])


def test_attention_stats_are_the_vision_blocks_own_attention(adapter, batch, monkeypatch):
    """Every block attends over one whole image (no windows): the statistics of blocks 0 and 3 equal the
    eager attention weights the tower computes, received = sum over heads, mean over queries and patches."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as hf

    recorded = []
    original = hf.eager_attention_forward

    def recording(module, query, key, *args, **kwargs):
        output, weights = original(module, query, key, *args, **kwargs)
        if isinstance(module, hf.Qwen3VLVisionAttention):
            recorded.append((weights[0], key[0]))  # (h, N, N), (h, N, hd) of one image in one block
        return output, weights

    monkeypatch.setattr(hf, "eager_attention_forward", recording)
    layers = (0, 3)
    with torch.no_grad():
        visual = adapter.encode_images(batch, attention_layers=layers)
        adapter.vision_attention(visual)
    n_images, depth = len(visual), len(adapter.vision_tower.blocks)
    assert len(recorded) == n_images * depth
    assert adapter.info().vision_full_attention == tuple(range(depth)) and not adapter.info().vision_windowed
    for image, tokens in enumerate(visual):
        n = tokens.embeds.shape[0]
        for layer in layers:
            weights, key = recorded[layer * n_images + image]
            stats = tokens.extras["vision_attention"][layer]
            expected = weights.sum(dim=0).mean(dim=0).view(n, 4).mean(dim=1)
            torch.testing.assert_close(stats["received"], expected)
            torch.testing.assert_close(stats["keys"], key.transpose(0, 1).reshape(n, 4, *key.shape[::2]))


def test_vision_flops_count_the_towers_matmuls(adapter):
    """Patch embedding, blocks (full attention over the image), merger and DeepStack mergers: the analytic
    count equals what torch's FlopCounterMode measures on the tower for one image."""
    from torch.utils.flop_counter import FlopCounterMode

    for image in (noise_image(300, 200), noise_image(96, 256)):
        one = adapter.preprocess([[image]], ["q"])
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            adapter.model.model.get_image_features(one.model_inputs["pixel_values"], one.model_inputs["image_grid_thw"])
        (tile,) = adapter.token_tiles(image)
        assert adapter.vision_flops(tile.grid) == counter.get_total_flops()


# --- (b) positions -----------------------------------------------------------------------------------------------
def test_initial_position_ids_are_the_forwards(adapter, batch):
    position_ids = adapter.initial_position_ids(batch)
    assert position_ids.shape == (3, *batch.input_ids.shape)
    valid = batch.attention_mask.bool()
    expected = _llm_inputs(adapter, batch)["position_ids"]
    assert torch.equal(position_ids[:, valid], expected[:, valid])


# --- (c) attention rows from the adapter's projections ----------------------------------------------------------
def attention_row(adapter, layer: torch.nn.Module, hidden, position_ids, attention_mask, project=None):
    """Softmax attention of the last position over every key at ``layer``, from its input hidden (b, L, d):
    the adapter's query/key projections (or ``project`` = (queries, keys)), its rotary, the layer's scaling."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import rotate_half

    def rope(x, cos, sin):  # x (b, heads, L, hd); cos/sin (b, L, hd)
        return x * cos[:, None] + rotate_half(x) * sin[:, None]

    queries, keys = project or (adapter.project_queries, adapter.project_keys)
    normed = layer.input_layernorm(hidden)
    cos, sin = adapter.rotary(hidden, position_ids)
    query = rope(queries(layer, normed)[:, :, -1:], cos[:, -1:], sin[:, -1:])
    key = rope(keys(layer, normed), cos, sin)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (query @ key.transpose(-1, -2))[:, :, 0] * layer.self_attn.scaling  # (b, h, L)
    return scores.masked_fill(~attention_mask.bool()[:, None], float("-inf")).softmax(dim=-1)


def _plain_projection(attr: str):
    def project(layer, normed):
        b, length, _ = normed.shape
        return getattr(layer.self_attn, attr)(normed).view(b, length, -1, layer.self_attn.head_dim).transpose(1, 2)

    return project


@pytest.mark.parametrize("index", [0, 2, 3])
def test_projected_queries_and_keys_give_the_models_attention_rows(adapter, batch, index):
    layer = adapter.layers[index]
    entered = {}
    handle = layer.register_forward_pre_hook(lambda module, args: entered.setdefault("hidden", args[0]))
    try:
        with torch.no_grad():
            out = adapter.model(**_forward_inputs(batch), output_attentions=True)
    finally:
        handle.remove()
    expected = out.attentions[index][:, :, -1]
    position_ids = adapter.initial_position_ids(batch)
    with torch.no_grad():
        row = attention_row(adapter, layer, entered["hidden"], position_ids, batch.attention_mask)
        without_qk_norm = attention_row(
            adapter, layer, entered["hidden"], position_ids, batch.attention_mask,
            project=(_plain_projection("q_proj"), _plain_projection("k_proj")),
        )  # fmt: skip
    torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(without_qk_norm, expected, rtol=1e-5, atol=1e-6)


# --- (d) DeepStack between decoder layers ------------------------------------------------------------------------
def _layerwise_logits(adapter, batch, visual, deepstack: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden after the final norm (b, L, d), last-position logits (b, vocab)) of a prefill run layer by
    layer: decoder layers with position embeddings and a causal + padding mask, then ``after_layer``."""
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    embeds = adapter.text_model.embed_tokens(input_ids)
    image_mask = input_ids == adapter.image_token_id
    embeds = embeds.masked_scatter(image_mask[..., None], torch.cat([v.embeds for v in visual]))
    visual_index = torch.full_like(input_ids, -1)
    for row in range(input_ids.shape[0]):
        visual_index[row, image_mask[row]] = torch.arange(int(image_mask[row].sum()))
    length = input_ids.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    position_embeddings = adapter.rotary(embeds, adapter.initial_position_ids(batch))
    hidden = embeds
    for index, layer in enumerate(adapter.layers):
        hidden = layer(hidden, position_embeddings=position_embeddings, attention_mask=mask)
        if deepstack:
            hidden = adapter.after_layer(index, hidden, visual_index, _per_sample(visual))
    return adapter.text_model.norm(hidden), adapter.logits(hidden[:, -1])


def test_layerwise_prefill_with_after_layer_is_the_forward(adapter, batch):
    with torch.no_grad():
        visual = adapter.encode_images(batch)
        out = adapter.model(**_forward_inputs(batch))
        hidden, logits = _layerwise_logits(adapter, batch, visual, deepstack=True)
        _, without = _layerwise_logits(adapter, batch, visual, deepstack=False)
    valid = batch.attention_mask.bool()
    reference = adapter.model.model(**_forward_inputs(batch)).last_hidden_state
    torch.testing.assert_close(hidden[valid], reference[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert (without - out.logits[:, -1]).abs().max() > 1e-3  # DeepStack changes the answer


def test_after_layer_adds_each_surviving_tokens_own_feature(adapter, family):
    """After a drop, a position carries its token's index among the sample's original visual tokens (images
    concatenated): it gets exactly that token's feature of the layer's level; text and later layers nothing."""
    d = adapter.text_config.hidden_size
    torch.manual_seed(0)

    def image(n: int):
        return family.VisualTokens(torch.zeros(n, d), [], extras={"deepstack": [torch.randn(n, d), torch.randn(n, d)]})

    visual = [[image(4)], [image(3), image(5)]]
    visual_index = torch.tensor([[-1, 3, 0, -1], [6, -1, 1, 2]])
    hidden = torch.randn(2, 4, d)
    out = adapter.after_layer(1, hidden, visual_index, visual)
    second = torch.cat([v.extras["deepstack"][1] for v in visual[1]])
    expected = hidden.clone()
    expected[0, 1] += visual[0][0].extras["deepstack"][1][3]
    expected[0, 2] += visual[0][0].extras["deepstack"][1][0]
    expected[1, 0] += second[6]
    expected[1, 2:] += second[1:3]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(adapter.after_layer(2, hidden, visual_index, visual), hidden)


# --- (e) config-only facts ----------------------------------------------------------------------------------------
def _shipped(name: str) -> dict:
    spec = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    spec.pop("_source")
    assert spec.pop("model_type") == "qwen3_vl"
    return spec


def test_tiny_model_info(adapter, family):
    expected = dict(
        name="tiny-qwen3-vl", n_layers=4, hidden_size=64, n_heads=4, vision_depth=4, vision_feature_layer=-1,
        vision_full_attention=(0, 1, 2, 3), patches_per_token=4, vision_hidden_size=32, has_cls=False,
        tiles_per_image=1, position_rows=3,
    )  # fmt: skip
    info = family.ADAPTER.info_from_config(adapter.model.config, "tiny-qwen3-vl")
    assert {key: getattr(info, key) for key in expected} == expected
    assert adapter.info() == info and not info.vision_windowed
    assert type(adapter.processor).__name__ == "Qwen3VLProcessor"


@pytest.mark.parametrize(
    "name, layers, hidden, heads, depth, width",
    [
        ("qwen3-vl-2b", 28, 2048, 16, 24, 1024),
        ("qwen3-vl-4b", 36, 2560, 32, 24, 1024),
        ("qwen3-vl-8b", 36, 4096, 32, 27, 1152),
    ],
)
def test_real_model_info(family, name, layers, hidden, heads, depth, width):
    config, _ = family.ADAPTER.random_parts(_shipped(name), None)
    info = family.ADAPTER.info_from_config(config, name)
    assert (info.n_layers, info.hidden_size, info.n_heads, info.vision_depth, info.vision_hidden_size) == (
        layers, hidden, heads, depth, width,
    )  # fmt: skip
    assert info.vision_full_attention == tuple(range(depth)) and info.vision_feature_layer == -1
    assert (info.patches_per_token, info.position_rows, info.has_cls, info.tiles_per_image) == (4, 3, False, 1)


def test_hub_ids_name_shipped_configs(family):
    assert set(family.ADAPTER.hub_configs.values()) == set(PUBLISHED)
    assert all((CONFIG_DIR / f"{name}.json").is_file() for name in family.ADAPTER.hub_configs.values())


# --- (f) real-size parameter counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_size_configs_have_the_released_parameter_counts(family, name):
    from transformers import AutoModelForImageTextToText

    config, processor = family.ADAPTER.random_parts(_shipped(name), None)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01
    tokenizer = processor.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.get_text_config().eos_token_id == tokenizer.eos_token_id
    assert config.get_text_config().pad_token_id == tokenizer.pad_token_id
    image_processor = processor.image_processor
    assert (image_processor.patch_size, image_processor.merge_size) == (16, 2)
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (65536, family.MAX_PIXELS)
