"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, 2x2 patch merge, M-RoPE.

Visual tokens: one contiguous run of ``<|image_pad|>`` per image; ``n = (H/28) * (W/28)`` after the
processor's ``smart_resize``. Positions: 3-D M-RoPE ids (temporal, row, col) from the model's own
``get_rope_index``; text after an image continues from the image's largest id + 1. After a drop the
engine keeps the surviving tokens' original ids (the official Qwen ports do the same).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from tokbench.models import tiny
from tokbench.models.base import ModelAdapter, PreparedBatch, Tile, VisualTokens, capture_blocks
from tokbench.pruner import ModelInfo

MAX_PIXELS = 12845056  # the released processors' longest_edge (pixels)


class Qwen25VLAdapter(ModelAdapter):
    position_rows = 3
    default_position_policy = "keep"
    tiny_models = {"tiny-qwen2.5-vl": {}, "tiny-qwen2.5-vl-deep": {"layers": 12}}
    hub_configs = {"Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b"}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    def _pixel_bounds(self) -> tuple[int, int, int]:
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        return factor, ip.size["shortest_edge"], ip.size["longest_edge"]

    @classmethod
    def info_from_config(cls, config, name: str) -> ModelInfo:
        vision = config.vision_config
        return cls._info(
            config,
            name,
            vision_depth=vision.depth,
            vision_feature_layer=-1,
            vision_full_attention=tuple(vision.fullatt_block_indexes),
            patches_per_token=vision.spatial_merge_size**2,
            vision_hidden_size=vision.hidden_size,
        )

    @classmethod
    def build_tiny(cls, path: Path, seed: int = 0, weights: Path | None = None, layers: int = 4) -> Path:
        """A tiny Qwen2.5-VL (``layers`` LLM layers, hidden 64; 4 ViT blocks of width 32): 224x224 .. 448x448
        pixels give 64 .. 256 merged visual tokens, enough to prune and small for CPUs.
        ``tiny-qwen2.5-vl-deep`` has 12 LLM layers, so in-LLM methods run at their papers' schedules."""
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        processor, ids = tiny.qwen_processor()
        special = tiny.qwen_token_ids(ids)
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(processor.tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                # head_dim 16 leaves 8 rotary frequencies, and M-RoPE gives the width section the 3 lowest: at
                # theta 1e4 they turn < 0.05 rad across 16 columns, so left/right is invisible to attention;
                # at 10 they turn 2-4 rad and the canary learns relative positions (docs/canary.md)
                rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=special["eos_token_id"],
                pad_token_id=special["pad_token_id"],
            ),
            vision_config=dict(
                depth=4,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[1, 3],
            ),
            tie_word_embeddings=False,
            **special,
        )
        torch.manual_seed(seed)
        model = tiny.with_weights(Qwen2_5_VLForConditionalGeneration(config), weights)
        return tiny.save_checkpoint(path, model, processor)

    @classmethod
    def random_parts(cls, spec: dict, max_pixels: int | None):
        from transformers import Qwen2_5_VLConfig

        processor, ids = tiny.qwen_processor(max_pixels=max_pixels or MAX_PIXELS)
        return Qwen2_5_VLConfig(**spec, **tiny.qwen_token_ids(ids)), processor

    def configure_processor(self, max_pixels: int | None) -> None:
        if max_pixels is not None:
            self.processor.image_processor.size["longest_edge"] = max_pixels

    def decode_pixel_cap(self, grid_factor: int) -> int | None:
        factor, _, max_pixels = self._pixel_bounds()
        return max_pixels if factor == grid_factor else None

    def project_vision(self, states: torch.Tensor) -> torch.Tensor:
        """(k, 4, d_v) last-block patch states -> (k, d) through the 2x2 patch merger."""
        return self.vision_tower.merger(states.reshape(-1, states.shape[-1]))

    def token_grid(self, image: Image.Image) -> tuple[int, int]:
        """(rows, cols) of the one grid the processor's ``smart_resize`` gives ``image``."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor, min_pixels, max_pixels = self._pixel_bounds()
        h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
        return h // factor, w // factor

    def token_tiles(self, image: Image.Image) -> list[Tile]:
        """One tile: the whole image, resized to the grid (aspect changes by at most one token)."""
        return [Tile(self.token_grid(image), (0.0, 0.0, float(image.width), float(image.height)))]

    def resize_to_tokens(self, image: Image.Image, n_tokens: int) -> Image.Image:
        """Shrink by a common factor until ``token_grid`` gives at most ``n_tokens`` (aspect kept)."""
        factor, _, _ = self._pixel_bounds()
        rows, cols = self.token_grid(image)
        scale = math.sqrt(n_tokens / (rows * cols))
        while True:
            h = max(factor, int(rows * factor * scale))
            w = max(factor, int(cols * factor * scale))
            resized = image.resize((w, h), Image.BICUBIC)
            r, c = self.token_grid(resized)
            if r * c <= n_tokens or (h == factor and w == factor):
                return resized
            scale *= 0.97

    def encode_images(
        self, batch: PreparedBatch, vision_layers: tuple[int, ...] = (), attention_layers: tuple[int, ...] = ()
    ) -> list[VisualTokens]:
        """Vision tower + merger for all images at once.

        Block states come out of the tower in window order, per patch; they are put back into merged
        raster order (n, u=4, d_v), the order of the LLM's visual tokens. Attention statistics are only
        defined for full-attention blocks (``fullatt_block_indexes``; 7/15/23/31 in the real models).
        """
        from transformers.vision_utils import get_vision_window_index

        tower = self.vision_tower
        depth = len(tower.blocks)
        for layer in attention_layers:
            if layer % depth not in tower.fullatt_block_indexes:
                raise ValueError(
                    f"vision block {layer} uses window attention; attention statistics need a full-attention "
                    f"block ({tower.fullatt_block_indexes})"
                )
        pixel_values = batch.model_inputs["pixel_values"]
        grid_thw = batch.model_inputs["image_grid_thw"]
        wanted_in, wanted_out = {v % depth for v in attention_layers}, {v % depth for v in vision_layers}
        with capture_blocks(tower.blocks, wanted_in, wanted_out) as captured:
            out = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        merge = tower.spatial_merge_size
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
        sizes = [r * c for r, c in grids]
        raster: dict[tuple[str, int], list[torch.Tensor]] = {}  # per image (n, u, d_v)
        if captured:
            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=merge, window_size=tower.window_size, patch_size=tower.patch_size
            )
            reverse = torch.argsort(window_index)
            for key, states in captured.items():
                units = states.reshape(-1, merge * merge, states.shape[-1])[reverse]
                raster[key] = list(torch.split(units, sizes))
        tokens = []
        for i, (emb, grid) in enumerate(zip(out.pooler_output, grids)):
            hidden = {layer: raster[("out", layer % depth)][i] for layer in vision_layers}
            extras = {}
            if attention_layers:
                extras["block_inputs"] = {layer: raster[("in", layer % depth)][i] for layer in attention_layers}
                extras["grid_thw"] = grid_thw[i : i + 1]
            tokens.append(VisualTokens(emb, batch.checked_tiles(i, [grid]), hidden, extras))
        return tokens

    def _attention_stats(self, layer: int, block_input: torch.Tensor, tokens: VisualTokens) -> dict:
        """Block ``layer``'s attention over one image, from its input (n, u, d_v) in raster order."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
        from transformers.vision_utils import get_vision_position_ids

        from tokbench.attention import attention_received

        tower = self.vision_tower
        block = tower.blocks[layer % len(tower.blocks)]
        n, unit, dim = block_input.shape
        patches = block_input.reshape(n * unit, dim)
        heads = block.attn.num_heads
        qkv = block.attn.qkv(block.norm1(patches)).reshape(n * unit, 3, heads, -1).permute(1, 0, 2, 3)
        positions = get_vision_position_ids(tokens.extras["grid_thw"], tower.spatial_merge_size)
        cos, sin = tower.rotary_pos_emb(patches, positions)
        query, key = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)  # (N, h, hd)
        received = attention_received(query.transpose(0, 1), key.transpose(0, 1), block.attn.scaling)
        return {"received": received.view(n, unit).mean(dim=1), "keys": key.reshape(n, unit, heads, -1)}

    def vision_flops(self, grid_hw: tuple[int, int]) -> float:
        """Patch embedding, ``depth`` blocks (window attention in 4x4-token windows, full attention in
        ``fullatt_block_indexes``) and the 2x2 merger MLP, for a ``rows x cols`` token grid."""
        from tokbench.metrics import vision_block_flops

        cfg = self.model.config.vision_config
        rows, cols = grid_hw
        unit = cfg.spatial_merge_size**2
        patches = rows * cols * unit
        side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # window side in tokens

        def squares(length: int) -> int:  # Σ of squared window extents along one axis
            full, rest = divmod(length, side)
            return full * side**2 + rest**2

        window_pairs = unit**2 * squares(rows) * squares(cols)
        embed = 2 * patches * cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2 * cfg.hidden_size
        blocks = sum(
            vision_block_flops(
                patches, cfg.hidden_size, cfg.intermediate_size, 3,
                patches**2 if b in cfg.fullatt_block_indexes else window_pairs,
            )
            for b in range(cfg.depth)
        )  # fmt: skip
        merged = unit * cfg.hidden_size
        merger = 2 * rows * cols * merged * (merged + cfg.out_hidden_size)
        return float(embed + blocks + merger)

    def initial_position_ids(self, batch: PreparedBatch) -> torch.Tensor:
        position_ids, _ = self.model.model.get_rope_index(
            batch.input_ids,
            mm_token_type_ids=batch.model_inputs["mm_token_type_ids"],
            image_grid_thw=batch.model_inputs.get("image_grid_thw"),
            attention_mask=batch.attention_mask,
        )
        return position_ids


ADAPTER = Qwen25VLAdapter
