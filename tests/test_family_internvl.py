"""InternVL3 (`tokbench/models/families/internvl.py`) against the model's and processor's own behaviour, on the
tiny offline checkpoint (112 px tiles, 16 tokens a tile, 12 tiles + thumbnail at most); real-size configs by
parameter count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import Image

from tokbench.metrics import count_flops
from tokbench.models.families.internvl import InternVLAdapter
from tokbench.models.random_weights import CONFIG_DIR

TILE = 112
SIZES = [(112, 112), (300, 150), (224, 224), (150, 420), (1344, 112), (333, 777), (90, 60)]


def _load(path, attn: str = "sdpa") -> InternVLAdapter:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return InternVLAdapter(model.eval(), AutoProcessor.from_pretrained(path), "tiny-internvl3")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return InternVLAdapter.build_tiny(tmp_path_factory.mktemp("internvl") / "tiny-internvl3")


@pytest.fixture(scope="module")
def internvl(checkpoint):
    return _load(checkpoint)


def _processed(adapter, image):
    """(image-token count in the processor's prompt, its tile count) for ``image`` alone."""
    batch = adapter.preprocess([[image]], ["q"])
    return int((batch.input_ids == adapter.image_token_id).sum()), batch.model_inputs["pixel_values"].shape[0]


def _own_features(adapter, batch) -> list[torch.Tensor]:
    """The model's own get_image_features, split per image by the image processor's own tile counts."""
    counts = [len(tiles) for tiles in batch.tiles]
    with torch.no_grad():
        features = adapter.model.model.get_image_features(batch.model_inputs["pixel_values"]).pooler_output
    return [f.reshape(-1, f.shape[-1]) for f in torch.split(features, counts)]


# --- tiles ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_token_tiles_count_what_the_processor_emits(internvl, size):
    image = noise_image(*size)
    tiles = internvl.token_tiles(image)
    n_context, n_tiles = _processed(internvl, image)
    assert sum(t.n_tokens for t in tiles) == n_context
    assert len(tiles) == n_tiles
    ip = internvl.processor.image_processor
    assert len(tiles) == ip.get_number_of_image_patches(size[1], size[0], {"crop_to_patches": True})


def test_tile_boxes_cover_what_each_processor_tile_shows(internvl):
    """A 168x112 image of 56 px colour cells is cut 3x2 (canvas 336x224): each tile's pixels are the colour of
    the cell its box covers; the thumbnail's box is the whole image."""
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 255, (2, 3, 3), dtype=np.uint8)
    image = Image.fromarray(np.kron(colours, np.ones((56, 56, 1), dtype=np.uint8)))
    tiles = internvl.token_tiles(image)
    pixels = internvl.preprocess([[image]], ["q"]).model_inputs["pixel_values"]
    ip = internvl.processor.image_processor
    rgb = pixels * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]
    assert len(tiles) == 7 and tiles[-1].box == (0.0, 0.0, 168.0, 112.0)
    for tile, shown in zip(tiles[:-1], rgb[:-1]):
        x0, y0, x1, y1 = tile.box
        cell = colours[int((y0 + y1) / 2) // 56, int((x0 + x1) / 2) // 56] / 255
        assert (x1 - x0, y1 - y0) == (56.0, 56.0)
        centre = shown[:, 40:72, 40:72].mean(dim=(1, 2))
        torch.testing.assert_close(centre, torch.tensor(cell, dtype=torch.float32), atol=0.02, rtol=0)


def test_tiles_per_image_is_the_most_one_image_makes(internvl):
    info = internvl.info()
    widest = internvl.token_tiles(noise_image(TILE * 12, TILE))
    assert len(widest) == info.tiles_per_image == internvl.processor.image_processor.max_patches + 1


# --- vision ----------------------------------------------------------------------------------------
def test_encode_images_equal_the_models_image_features(internvl):
    """One image needing one tile, one needing several plus the thumbnail, in two samples."""
    one, several = noise_image(112, 112, seed=1), noise_image(300, 150, seed=2)
    batch = internvl.preprocess([[one], [several, one]], ["a?", "bb?"])
    with torch.no_grad():
        visual = internvl.encode_images(batch)
    own = _own_features(internvl, batch)
    assert [len(v.tiles) for v in visual] == [1, 3, 1]
    for tokens, expected in zip(visual, own):
        assert tokens.embeds.shape[0] == sum(t.n_tokens for t in tokens.tiles)
        torch.testing.assert_close(tokens.embeds, expected, rtol=0, atol=0)


def test_visual_tokens_fill_contiguous_runs_in_embeds_order(internvl):
    """Writing each image's embeds into its run of <IMG_CONTEXT> in order reproduces the model's logits."""
    batch = internvl.preprocess([[noise_image(300, 150, seed=3), noise_image(112, 224, seed=4)]], ["which?"])
    with torch.no_grad():
        visual = internvl.encode_images(batch)
        is_image = (batch.input_ids[0] == internvl.image_token_id).long()
        starts = (is_image.diff(prepend=torch.zeros(1, dtype=torch.long)) == 1).nonzero().flatten().tolist()
        assert len(starts) == len(visual)
        embeds = internvl.text_model.embed_tokens(batch.input_ids)
        for start, tokens in zip(starts, visual):
            assert bool(is_image[start : start + len(tokens.embeds)].all())
            embeds[0, start : start + len(tokens.embeds)] = tokens.embeds
        ours = internvl.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        theirs = internvl.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                **batch.model_inputs).logits  # fmt: skip
    torch.testing.assert_close(ours, theirs)


def test_project_vision_of_the_feature_layer_reproduces_embeds(internvl):
    feature = internvl.info().vision_feature_layer
    batch = internvl.preprocess([[noise_image(224, 224, seed=5)]], ["q"])
    with torch.no_grad():
        (tokens,) = internvl.encode_images(batch, vision_layers=(feature,))
        projected = internvl.project_vision(tokens.vision_hidden[feature])
    torch.testing.assert_close(projected, tokens.embeds)


def test_vision_hidden_groups_each_tokens_2x2_patches(internvl):
    """vision_hidden[b][k, u] is the block's output for patch (2i + u // 2, 2j + u % 2) of token k = (tile, i, j);
    extras['cls'][b] each tile's CLS output; from the tower's own hidden states."""
    batch = internvl.preprocess([[noise_image(300, 150, seed=6)]], ["q"])
    pixels = batch.model_inputs["pixel_values"]
    with torch.no_grad():
        (tokens,) = internvl.encode_images(batch, vision_layers=(1,))
        states = internvl.vision_tower(pixels, output_hidden_states=True).hidden_states[2]  # output of block 1
    side = TILE // 14
    half = side // 2
    for k in range(tokens.vision_hidden[1].shape[0]):
        tile, within = divmod(k, half * half)
        i, j = divmod(within, half)
        for u in range(4):
            patch = (2 * i + u // 2) * side + 2 * j + u % 2
            assert torch.equal(tokens.vision_hidden[1][k, u], states[tile, 1 + patch])
    assert torch.equal(tokens.extras["cls"][1], states[:, 0])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_stats_equal_the_towers_eager_attention(checkpoint, qk_norm):
    """CLS row and received attention against the tower's own eager weights (with q/k norms when configured);
    keys against its k projection."""
    from transformers import AutoModelForImageTextToText

    adapter = _load(checkpoint, "eager")
    if qk_norm:
        config = adapter.model.config
        config.vision_config.use_qk_norm = True
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="eager").eval()
        for name, param in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                param.data.uniform_(0.5, 2.0)
        adapter = InternVLAdapter(model, adapter.processor, "qk")
    block = 2
    batch = adapter.preprocess([[noise_image(300, 150, seed=7)]], ["q"])
    pixels = batch.model_inputs["pixel_values"]
    keys_seen = {}
    attn = adapter.vision_tower.encoder.layer[block].attention
    handle = attn.k_norm.register_forward_hook(lambda m, a, out: keys_seen.setdefault("k", out))
    with torch.no_grad():
        weights = adapter.vision_tower(pixels, output_attentions=True).attentions[block]  # (T, h, 1+P, 1+P)
        handle.remove()
        (tokens,) = adapter.encode_images(batch, attention_layers=(block,))
        adapter.vision_attention([tokens])
    stats = tokens.extras["vision_attention"][block]
    tiles, heads, length, _ = weights.shape
    side, half = TILE // 14, TILE // 28

    def per_token(values: torch.Tensor) -> torch.Tensor:  # (T, ..., P) over patches -> (..., n), mean of 2x2
        grid = values.reshape(*values.shape[:-1], half, 2, half, 2).mean(dim=(-3, -1))
        return grid.flatten(-2).movedim(0, -2).flatten(-2)

    torch.testing.assert_close(stats["cls"], per_token(weights[:, :, 0, 1:]))
    received = weights.sum(dim=1).mean(dim=1)[:, 1:]  # (T, P): summed over heads, mean over queries
    torch.testing.assert_close(stats["received"], per_token(received))
    keys = keys_seen["k"].view(tiles, length, heads, -1)[:, 1:]  # (T, P, h, hd)
    k = 0
    for tile in range(tiles):
        for i in range(half):
            for j in range(half):
                for u in range(4):
                    patch = (2 * i + u // 2) * side + 2 * j + u % 2
                    assert torch.equal(stats["keys"][k, u], keys[tile, patch])
                k += 1


def test_vision_flops_equal_counted_tower(internvl):
    """One tile: patch embedding, every block, the projector, exactly what torch counts."""
    batch = internvl.preprocess([[noise_image(112, 112)]], ["q"])
    pixels = batch.model_inputs["pixel_values"]
    with torch.no_grad():
        counted = count_flops(lambda: internvl.model.model.get_image_features(pixels))
    (tile,) = internvl.token_tiles(noise_image(112, 112))
    assert internvl.vision_flops(tile.grid) == counted


# --- resizing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(300, 150), (224, 224), (333, 777), (1344, 112)])
def test_resize_to_tokens_keeps_at_most_the_budget(internvl, size):
    """Budgets from all of the image's tokens down to below one tile: the processor emits what token_tiles
    says, never more than the budget, and the tower encodes it."""
    image = noise_image(*size, seed=8)
    full = internvl.n_visual_tokens(image)
    for budget in sorted({full, full - 1, 2 * 16, 16, 15, 9, 4, 1}, reverse=True):
        resized = internvl.resize_to_tokens(image, budget)
        n_context, _ = _processed(internvl, resized)
        assert n_context == internvl.n_visual_tokens(resized) <= budget
        if budget == full:
            assert resized is image
    small = internvl.resize_to_tokens(image, 9)
    batch = internvl.preprocess([[small]], ["q"])
    with torch.no_grad():
        (tokens,) = internvl.encode_images(batch)
    torch.testing.assert_close(tokens.embeds, _own_features(internvl, batch)[0])
    assert [t.grid for t in tokens.tiles] == [(3, 3)]
    assert internvl.processor.image_seq_length == 16 and internvl.processor.image_processor.size["height"] == TILE


def test_a_batch_mixing_tile_sizes_is_refused(internvl):
    small, smaller = (internvl.resize_to_tokens(noise_image(300, 150), n) for n in (9, 4))
    for other in (noise_image(300, 150), smaller):
        with pytest.raises(ValueError, match="downsample with batch size 1"):
            internvl.preprocess([[small], [other]], ["a", "b"])


# --- positions --------------------------------------------------------------------------------------
def test_initial_position_ids_are_what_the_model_uses(internvl):
    """Left-padded batch: the ids generate makes, and the padded sample's logits equal its unpadded run's."""
    images = [[noise_image(112, 112, seed=9)], [noise_image(300, 150, seed=10)]]
    batch = internvl.preprocess(images, ["a much longer question than the other one?", "b?"])
    positions = internvl.initial_position_ids(batch)
    assert positions.shape == (1, *batch.input_ids.shape)
    mask = {"attention_mask": batch.attention_mask}
    made = internvl.model._prepare_position_ids_for_generation(batch.input_ids, mask)
    assert torch.equal(positions[0], made)
    alone = internvl.preprocess(images[1:], ["b?"])
    with torch.no_grad():
        padded = internvl.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=positions[0], **batch.model_inputs).logits[1, -1]  # fmt: skip
        single = internvl.model(input_ids=alone.input_ids, **alone.model_inputs).logits[0, -1]
    assert int((batch.attention_mask[1] == 0).sum()) > 0
    torch.testing.assert_close(padded, single, rtol=1e-4, atol=1e-4)


# --- config-only facts ------------------------------------------------------------------------------
def test_info_from_config(internvl):
    config = internvl.model.config
    info = InternVLAdapter.info_from_config(config, "tiny-internvl3")
    assert info == internvl.info()
    depth = len(internvl.vision_tower.encoder.layer)
    assert (info.n_layers, info.hidden_size, info.n_heads) == (len(internvl.layers), 64, 4)
    assert (info.vision_depth, info.vision_full_attention, info.vision_hidden_size) == (depth, tuple(range(depth)), 32)
    assert (info.has_cls, info.patches_per_token, info.position_rows, info.vision_feature_layer) == (True, 4, 1, -1)
    assert not info.vision_windowed


# Released sizes: the bf16 safetensors of each -hf repo (huggingface.co/OpenGVLab/InternVL3-{1B,2B,8B}-hf, files
# tab): 1B model.safetensors 1.88 GB; 2B model.safetensors 4.18 GB; 8B shards 4.88 + 4.99 + 4.93 + 1.09 GB;
# 2 bytes a parameter.
RELEASED = {"internvl3-1b": (1.88e9 / 2, 24), "internvl3-2b": (4.18e9 / 2, 28), "internvl3-8b": (15.89e9 / 2, 28)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_shipped_configs_match_released_parameter_counts(name):
    from transformers import AutoModelForImageTextToText

    spec = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    spec.pop("_source")
    assert spec.pop("model_type") == "internvl"
    config, processor = InternVLAdapter.random_parts(spec, None)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    released, layers = RELEASED[name]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(released, rel=0.01)
    info = InternVLAdapter.info_from_config(config, name)
    assert (info.n_layers, info.vision_depth, info.tiles_per_image) == (layers, 24, 13)
    assert processor.image_seq_length == config.image_seq_length == 256
    assert config.image_token_id == processor.tokenizer.context_image_token_id
    assert config.get_text_config().eos_token_id == processor.tokenizer.eos_token_id
    assert set(InternVLAdapter.hub_configs.values()) == set(RELEASED)
