"""Vision-tower attention statistics, recomputed per block, against the model's own eager attention maps."""

from __future__ import annotations

import pytest
import torch
from conftest import noise_image, tiny_adapter


def test_clip_cls_row_and_received_match_eager():
    adapter = tiny_adapter("tiny-llava", attn="eager")
    batch = adapter.preprocess([[noise_image(448, 336)], [noise_image(224, 224, seed=1)]], ["a", "b"])
    with torch.no_grad():
        tokens = adapter.encode_images(batch, (), (-2,))
        adapter.vision_attention(tokens)
        ref = adapter.model.model.vision_tower(
            batch.model_inputs["pixel_values"], output_attentions=True, return_dict=True
        ).attentions[-2]  # (b, h, 1+n, 1+n)
    for i, visual in enumerate(tokens):
        stats = visual.extras["vision_attention"][-2]
        torch.testing.assert_close(stats["cls"], ref[i, :, 0, 1:].float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats["received"], ref[i].sum(0).mean(0)[1:].float(), atol=1e-5, rtol=1e-4)
        assert stats["keys"].shape == (256, 1, 2, 16)


def test_qwen_received_matches_the_towers_own_inputs():
    """Recompute the map from what the block really received (window order, its own RoPE) and compare."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    adapter = tiny_adapter("tiny-qwen2.5-vl")
    batch = adapter.preprocess([[noise_image(448, 336)]], ["a"])
    tower = adapter.vision_tower
    block = tower.fullatt_block_indexes[-1]
    attn = tower.blocks[block].attn
    seen = {}
    handle = attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0], rope=kwargs["position_embeddings"]), with_kwargs=True
    )
    grid = batch.model_inputs["image_grid_thw"]
    try:
        with torch.no_grad():
            (visual,) = adapter.encode_images(batch, (), (block,))
            adapter.vision_attention([visual])
    finally:
        handle.remove()
    x = seen["x"]
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["rope"])
    probs = (q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2) * attn.scaling).softmax(-1)  # (h, N, N)
    window_index, _ = get_vision_window_index(
        grid, spatial_merge_size=2, window_size=tower.window_size, patch_size=tower.patch_size
    )
    received = probs.sum(0).mean(0).view(-1, 4)[torch.argsort(window_index)].mean(1)
    torch.testing.assert_close(visual.extras["vision_attention"][block]["received"], received, atol=1e-5, rtol=1e-4)


def test_window_block_is_refused():
    adapter = tiny_adapter("tiny-qwen2.5-vl")
    batch = adapter.preprocess([[noise_image(224, 224)]], ["a"])
    window_block = next(i for i in range(len(adapter.vision_tower.blocks)) if i not in adapter.vision_tower.fullatt_block_indexes)
    with pytest.raises(ValueError, match="window attention"):
        adapter.encode_images(batch, (), (window_block,))


def test_tower_keeps_only_the_blocks_asked_for(adapter):
    """Block states come from hooks on the chosen blocks; the statistics replace the kept block inputs."""
    batch = adapter.preprocess([[noise_image(224, 224)]], ["a"])
    block = adapter.info().vision_full_attention[-1]
    with torch.no_grad():
        (visual,) = adapter.encode_images(batch, (0,), (block,))
    assert set(visual.vision_hidden) == {0} and set(visual.extras["block_inputs"]) == {block}
    with torch.no_grad():
        adapter.vision_attention([visual])
    assert "block_inputs" not in visual.extras and set(visual.extras["vision_attention"]) == {block}
