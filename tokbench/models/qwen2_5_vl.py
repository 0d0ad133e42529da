"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, 2x2 patch merge, M-RoPE.

Visual tokens: one contiguous run of ``<|image_pad|>`` per image; ``n = (H/28) * (W/28)`` after the
processor's ``smart_resize``. Positions: 3-D M-RoPE ids (temporal, row, col) from the model's own
``get_rope_index``; text after an image continues from the image's largest id + 1. After a drop the
engine keeps the surviving tokens' original ids (the official Qwen ports do the same).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from tokbench.models.base import ModelAdapter, PreparedBatch, VisualTokens


class Qwen25VLAdapter(ModelAdapter):
    family = "qwen2_5_vl"
    position_rows = 3
    default_position_policy = "keep"

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    def _pixel_bounds(self) -> tuple[int, int, int]:
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        return factor, ip.size["shortest_edge"], ip.size["longest_edge"]

    def token_grid(self, image: Image.Image) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor, min_pixels, max_pixels = self._pixel_bounds()
        h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
        return h // factor, w // factor

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

    def encode_images(self, batch: PreparedBatch, vision_layers: tuple[int, ...] = ()) -> list[VisualTokens]:
        """Vision tower + merger for all images at once.

        Block outputs come out of the tower in window order, per patch; they are put back into merged
        raster order (n, u=4, d_v), the order of the LLM's visual tokens.
        """
        from transformers.vision_utils import get_vision_window_index

        pixel_values = batch.model_inputs["pixel_values"]
        grid_thw = batch.model_inputs["image_grid_thw"]
        out = self.model.model.get_image_features(
            pixel_values, grid_thw, output_hidden_states=bool(vision_layers), return_dict=True
        )
        merge = self.vision_tower.spatial_merge_size
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
        hidden: dict[int, list[torch.Tensor]] = {}
        if vision_layers:
            cfg = self.vision_tower
            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=merge, window_size=cfg.window_size, patch_size=cfg.patch_size
            )
            reverse = torch.argsort(window_index)
            sizes = [r * c for r, c in grids]
            for layer in vision_layers:
                states = out.hidden_states[layer + 1 if layer >= 0 else layer]  # [0] is the patch embedding
                units = states.reshape(-1, merge * merge, states.shape[-1])[reverse]  # (sum n, u, d_v)
                hidden[layer] = list(torch.split(units, sizes))
        return [
            VisualTokens(
                embeds=emb,
                grid_hw=grid,
                vision_hidden={layer: hidden[layer][i] for layer in vision_layers},
            )
            for i, (emb, grid) in enumerate(zip(out.pooler_output, grids))
        ]

    def initial_position_ids(self, batch: PreparedBatch) -> torch.Tensor:
        position_ids, _ = self.model.model.get_rope_index(
            batch.input_ids,
            mm_token_type_ids=batch.model_inputs["mm_token_type_ids"],
            image_grid_thw=batch.model_inputs.get("image_grid_thw"),
            attention_mask=batch.attention_mask,
        )
        return position_ids
