"""Qwen3-VL, dense (`Qwen3VLForConditionalGeneration`): dynamic resolution, 16-pixel patches merged 2x2,
interleaved M-RoPE, QK-norm in the LLM, and DeepStack.

Visual tokens: one contiguous run of ``<|image_pad|>`` per image; ``n = (H/32) * (W/32)`` after the
processor's ``smart_resize`` (patch 16, merge 2). The vision tower attends over each whole image in every
block (no windows), and its patches arrive already grouped per merged token, raster order over tokens.
Positions: 3-D M-RoPE ids (temporal, row, col) from the model's own ``get_rope_index``; the engine keeps
the survivors' original ids after a drop, as for Qwen2.5-VL.

DeepStack: blocks ``deepstack_visual_indexes`` of the tower each feed their own 2x2 merger; the output of
level ``i`` (n, d) is added to the image-token hidden states after LLM decoder layer ``i`` (prefill only).
`encode_images` keeps them per image in ``extras["deepstack"]``; `after_layer` adds them to the visual
positions that are still present.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokbench.models import tiny
from tokbench.models.base import PreparedBatch, VisualTokens, capture_blocks
from tokbench.models.families.qwen2_5_vl import Qwen25VLAdapter
from tokbench.pruner import ModelInfo

MIN_PIXELS = 65536  # the released processors' shortest_edge (pixels): 256x256, 64 tokens
MAX_PIXELS = 16777216  # the released processors' longest_edge (pixels): 4096x4096, 16384 tokens


def qwen3_processor(min_pixels: int, max_pixels: int):
    """A Qwen3-VL processor (16-pixel patches, 2x2 merge, mean/std 0.5 as released) over the offline
    byte-level tokenizer; returns (processor, special-token ids)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer, ids = tiny.qwen_tokenizer()
    half = [0.5, 0.5, 0.5]
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=half,
        image_std=half,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, image_mean=half, image_std=half),
        chat_template=tiny.QWEN_CHAT_TEMPLATE,
    )
    return processor, ids


def token_ids(ids: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(top-level, text-config) config fields naming special tokens of the offline tokenizer."""
    top = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return top, dict(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


class Qwen3VLAdapter(Qwen25VLAdapter):
    """As Qwen2.5-VL for the token grid, resizing, positions, vision attention statistics and the merger;
    its own config facts, tower layout (no windows), QK-norm projections, DeepStack and FLOPs."""

    tiny_models = {"tiny-qwen3-vl": {}}
    hub_configs = {
        "Qwen/Qwen3-VL-2B-Instruct": "qwen3-vl-2b",
        "Qwen/Qwen3-VL-4B-Instruct": "qwen3-vl-4b",
        "Qwen/Qwen3-VL-8B-Instruct": "qwen3-vl-8b",
    }

    # --- config-only facts and offline models ----------------------------------------------------
    @classmethod
    def info_from_config(cls, config, name: str) -> ModelInfo:
        """Every vision block attends over the whole image; the merger reads the last block (-1)."""
        vision = config.vision_config
        return cls._info(
            config,
            name,
            vision_depth=vision.depth,
            vision_feature_layer=-1,
            vision_full_attention=tuple(range(vision.depth)),
            patches_per_token=vision.spatial_merge_size**2,
            vision_hidden_size=vision.hidden_size,
        )

    @classmethod
    def build_tiny(cls, path: Path, seed: int = 0, weights: Path | None = None) -> Path:
        """A tiny Qwen3-VL: LLM 4 layers of width 64 (4 query / 2 key heads of 16); tower 4 blocks of width 32,
        DeepStack from blocks 1 and 2 into LLM layers 0 and 1. 256x256 .. 512x512 pixels give 64 .. 256
        merged visual tokens."""
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        processor, ids = qwen3_processor(min_pixels=64 * 64, max_pixels=512 * 512)
        top, text_ids = token_ids(ids)
        config = Qwen3VLConfig(
            text_config=dict(
                vocab_size=len(processor.tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=4096,
                # head_dim 16: 8 rotary frequencies, interleaved t/h/w as 3/3/2; theta 10 (as the tiny
                # Qwen2.5-VL) so that row/column offsets turn the low frequencies visibly
                rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [3, 3, 2]},
                **text_ids,
            ),
            vision_config=dict(
                depth=4,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=256,
                deepstack_visual_indexes=[1, 2],
            ),
            tie_word_embeddings=False,
            **top,
        )
        torch.manual_seed(seed)
        model = tiny.with_weights(Qwen3VLForConditionalGeneration(config), weights)
        return tiny.save_checkpoint(path, model, processor)

    @classmethod
    def random_parts(cls, spec: dict, max_pixels: int | None):
        from transformers import Qwen3VLConfig

        processor, ids = qwen3_processor(MIN_PIXELS, max_pixels or MAX_PIXELS)
        top, text_ids = token_ids(ids)
        spec = {**spec, "text_config": {**spec["text_config"], **text_ids}}
        return Qwen3VLConfig(**spec, **top), processor

    # --- the language model ----------------------------------------------------------------------
    def project_queries(self, layer: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """normed (b, L, d) -> (b, h, L, hd): ``q_proj``, then the per-head RMSNorm ``q_norm`` (before RoPE)."""
        attn = layer.self_attn
        b, length, _ = normed.shape
        return attn.q_norm(attn.q_proj(normed).view(b, length, -1, attn.head_dim)).transpose(1, 2)

    def project_keys(self, layer: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """normed (b, L, d) -> (b, h_kv, L, hd): ``k_proj``, then the per-head RMSNorm ``k_norm`` (before RoPE)."""
        attn = layer.self_attn
        b, length, _ = normed.shape
        return attn.k_norm(attn.k_proj(normed).view(b, length, -1, attn.head_dim)).transpose(1, 2)

    def after_layer(
        self, index: int, hidden: torch.Tensor, visual_index: torch.Tensor, visual: list[list[VisualTokens]]
    ) -> torch.Tensor:
        """DeepStack: after decoder layer ``index`` < levels, each visual position gains its token's level-``index``
        feature (``extras["deepstack"][index]``), in the hidden states' dtype, as ``Qwen3VLTextModel`` does.

        hidden (b, L, d); visual_index (b, L): index into the sample's original visual tokens, -1 for text.
        """
        if index >= len(self.model.config.vision_config.deepstack_visual_indexes):
            return hidden
        rows, cols = (visual_index >= 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return hidden
        features = [image.extras["deepstack"][index] for sample in visual for image in sample]
        table = torch.cat(features).to(hidden.device, hidden.dtype)  # (Σ n, d), samples in batch order
        counts = torch.tensor([sum(image.embeds.shape[0] for image in sample) for sample in visual])
        offsets = (torch.cumsum(counts, 0) - counts).to(hidden.device)
        hidden = hidden.clone()
        hidden[rows, cols] = hidden[rows, cols] + table[offsets[rows] + visual_index[rows, cols]]
        return hidden

    # --- inputs / vision -------------------------------------------------------------------------
    def encode_images(
        self, batch: PreparedBatch, vision_layers: tuple[int, ...] = (), attention_layers: tuple[int, ...] = ()
    ) -> list[VisualTokens]:
        """Tower, merger and DeepStack mergers for all images at once.

        The tower's patch sequence is already grouped per merged token (4 consecutive patches) in raster
        order over each image's token grid, images one after another: a block's states (N, d_v) reshape
        straight to (n, u=4, d_v) with no reordering. Every block attends over the whole image, so any block
        can give attention statistics.
        """
        tower = self.vision_tower
        depth = len(tower.blocks)
        grid_thw = batch.model_inputs["image_grid_thw"]
        wanted_in, wanted_out = {v % depth for v in attention_layers}, {v % depth for v in vision_layers}
        with capture_blocks(tower.blocks, wanted_in, wanted_out) as captured:
            out = self.model.model.get_image_features(batch.model_inputs["pixel_values"], grid_thw, return_dict=True)
        merge = tower.spatial_merge_size
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
        sizes = [rows * cols for rows, cols in grids]
        per_image = {  # block states as (n, u, d_v) per image
            key: torch.split(states.reshape(-1, merge * merge, states.shape[-1]), sizes)
            for key, states in captured.items()
        }
        tokens = []
        for i, (embeds, grid) in enumerate(zip(out.pooler_output, grids, strict=True)):
            hidden = {layer: per_image[("out", layer % depth)][i] for layer in vision_layers}
            extras = {"deepstack": [level[i] for level in out.deepstack_features]}
            if attention_layers:
                extras["block_inputs"] = {layer: per_image[("in", layer % depth)][i] for layer in attention_layers}
                extras["grid_thw"] = grid_thw[i : i + 1]
            tokens.append(VisualTokens(embeds, batch.checked_tiles(i, [grid]), hidden, extras))
        return tokens

    def vision_flops(self, grid_hw: tuple[int, int]) -> float:
        """One tile of ``rows x cols`` tokens: patch embedding, ``depth`` full-attention blocks (plain 2-matmul
        MLP), the 2x2 merger and one more merger per DeepStack level (each fc1 4d_v -> 4d_v, fc2 4d_v -> d)."""
        from tokbench.metrics import vision_block_flops

        cfg = self.model.config.vision_config
        rows, cols = grid_hw
        unit = cfg.spatial_merge_size**2
        patches = rows * cols * unit
        embed = 2 * patches * cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2 * cfg.hidden_size
        block = vision_block_flops(patches, cfg.hidden_size, cfg.intermediate_size, 2, patches**2)
        merged = unit * cfg.hidden_size
        merger = 2 * rows * cols * merged * (merged + cfg.out_hidden_size)
        return float(embed + cfg.depth * block + (1 + len(cfg.deepstack_visual_indexes)) * merger)
ADAPTER = Qwen3VLAdapter
