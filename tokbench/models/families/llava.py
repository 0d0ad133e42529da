"""LLaVA-1.5 in the llava-hf format (`LlavaForConditionalGeneration`): CLIP ViT + MLP projector + Llama.

Visual tokens: ``(S/14)^2`` per image (576 at S = 336), the CLIP patch outputs of layer
``vision_feature_layer`` (-2) without CLS, one contiguous run of ``<image>`` tokens. Positions: 1-D RoPE
ids ``0..L-1`` over the non-padding tokens. The official LLaVA pruning code re-indexes positions
contiguously after a drop; that is this family's default position policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from tokbench.models import tiny
from tokbench.models.base import ModelAdapter, PreparedBatch, Tile, VisualTokens, capture_blocks, downsampled_side
from tokbench.pruner import ModelInfo


class LlavaAdapter(ModelAdapter):
    position_rows = 1
    default_position_policy = "reindex"
    tiny_models = {"tiny-llava": {}}
    hub_configs = {"llava-hf/llava-1.5-7b-hf": "llava-1.5-7b", "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b"}

    @property
    def _patch(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def _image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @classmethod
    def info_from_config(cls, config, name: str) -> ModelInfo:
        vision = config.vision_config
        depth = vision.num_hidden_layers
        return cls._info(
            config,
            name,
            vision_depth=depth,
            vision_feature_layer=config.vision_feature_layer,
            vision_full_attention=tuple(range(depth)),
            patches_per_token=1,
            vision_hidden_size=vision.hidden_size,
            has_cls=True,
        )

    @classmethod
    def build_tiny(cls, path: Path, seed: int = 0, weights: Path | None = None) -> Path:
        """A tiny LLaVA-1.5 (CLIP ViT 4 layers at 224 px -> 256 patches; Llama 4 layers of width 64).

        Two init choices make the relative-position questions learnable from scratch (docs/canary.md):
        the tower's position table starts as a 2-D sin-cos table (`tiny.sincos_positions`; a released
        CLIP's learned table is 2-D structured, a random one is not), and the weights start at std 0.06
        instead of 0.02, so that attention is selective enough at init to find one square.
        """
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        image_size, patch = 224, 14
        processor, ids = tiny.llava_processor(image_size, patch)
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=len(processor.tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            initializer_range=0.06,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=(image_size // patch) ** 2,
            **tiny.llava_token_ids(ids),
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        with torch.no_grad():
            table = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + g*g, d): CLS first
            table[0] = 0
            table[1:] = tiny.sincos_positions(image_size // patch, vision.hidden_size)
        model = tiny.with_weights(model, weights)
        return tiny.save_checkpoint(path, model, processor)

    @classmethod
    def random_parts(cls, spec: dict, max_pixels: int | None):
        from transformers import LlavaConfig

        vision = spec["vision_config"]
        processor, ids = tiny.llava_processor(vision["image_size"], vision["patch_size"])
        return LlavaConfig(**spec, **tiny.llava_token_ids(ids)), processor

    def project_vision(self, states: torch.Tensor) -> torch.Tensor:
        """(k, 1, d_v) CLIP feature-layer states -> (k, d) through the MLP projector."""
        return self.model.model.multi_modal_projector(states[:, 0])

    def token_tiles(self, image: Image.Image) -> list[Tile]:
        """One tile: the centre square the processor crops (after its shortest-edge resize)."""
        side = image.info.get("tokbench_side", self._image_size) // self._patch
        short = min(image.size)
        left, top = (image.width - short) / 2, (image.height - short) / 2
        return [Tile((side, side), (left, top, left + short, top + short))]

    def resize_to_tokens(self, image: Image.Image, n_tokens: int) -> Image.Image:
        """A square crop at ``14 * floor(sqrt(n_tokens))`` px; the tower interpolates its position table.

        The result is marked (``info["tokbench_side"]``) so that `preprocess` feeds it at that size
        instead of resizing it back up to the tower's input size.
        """
        side = self._patch * max(1, math.isqrt(n_tokens))
        image = image.convert("RGB")
        short = min(image.size)
        left, top = (image.width - short) // 2, (image.height - short) // 2
        resized = image.crop((left, top, left + short, top + short)).resize((side, side), Image.BICUBIC)
        resized.info["tokbench_side"] = side
        return resized

    def preprocess(self, images: list[list[Image.Image]], questions: list[str]) -> PreparedBatch:
        """As the base class; images downsampled by `resize_to_tokens` keep their reduced size."""
        side = downsampled_side(images)
        if side is None:
            return super().preprocess(images, questions)
        ip = self.processor.image_processor
        saved = (ip.size, ip.crop_size)
        ip.size, ip.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
        try:
            return super().preprocess(images, questions)
        finally:
            ip.size, ip.crop_size = saved

    def encode_images(
        self, batch: PreparedBatch, vision_layers: tuple[int, ...] = (), attention_layers: tuple[int, ...] = ()
    ) -> list[VisualTokens]:
        """CLIP tower + projector; block outputs (n, u=1, d_v) without CLS, CLS under ``extras['cls']``.

        Block ``i`` of the tower's hidden states: index 0 entered block 0, ``i + 1`` left block ``i``; the
        feature layer (-2) is the output of block ``depth - 2``. Only the blocks asked for are kept.
        """
        cfg = self.model.config
        tower = self.model.model.vision_tower
        blocks = tower.encoder.layers
        depth = len(blocks)
        feature = cfg.vision_feature_layer % (depth + 1) - 1  # hidden_states index -> block whose output it is
        pixel_values = batch.model_inputs["pixel_values"].to(self.dtype)
        interpolate = pixel_values.shape[-1] != self._image_size
        wanted_out = {v % depth for v in vision_layers} | {feature}
        with capture_blocks(blocks, {v % depth for v in attention_layers}, wanted_out) as captured:
            tower(pixel_values, interpolate_pos_encoding=interpolate, return_dict=True)
        selected = captured[("out", feature)]
        if cfg.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        embeds = self.model.model.multi_modal_projector(selected)  # (b_img, n, d)
        side = pixel_values.shape[-1] // self._patch
        tokens = []
        for i in range(embeds.shape[0]):
            hidden = {layer: captured[("out", layer % depth)][i, 1:, None] for layer in vision_layers}
            extras: dict = {"cls": {layer: captured[("out", layer % depth)][i, None, 0] for layer in vision_layers}}  # (T=1, d_v)
            if attention_layers:
                extras["block_inputs"] = {layer: captured[("in", layer % depth)][i] for layer in attention_layers}
            tokens.append(VisualTokens(embeds[i], batch.checked_tiles(i, [(side, side)]), hidden, extras))
        return tokens

    def _attention_stats(self, layer: int, block_input: torch.Tensor, tokens: VisualTokens) -> dict[str, torch.Tensor]:
        """CLIP block ``layer``'s attention from its input (1 + n, d_v): CLS row, received, keys."""
        from tokbench.attention import attention_received

        block = self.model.model.vision_tower.encoder.layers[layer]
        attn = block.self_attn
        normed = block.layer_norm1(block_input)
        length = normed.shape[0]
        query = attn.q_proj(normed).view(length, attn.num_heads, -1).transpose(0, 1)  # (h, 1+n, hd)
        key = attn.k_proj(normed).view(length, attn.num_heads, -1).transpose(0, 1)
        cls = (query[:, :1].float() @ key.float().transpose(-1, -2) * attn.scale).softmax(-1)[:, 0, 1:]
        received = attention_received(query, key, attn.scale)[1:]
        keys = key[:, 1:].transpose(0, 1)[:, None]  # (n, u=1, h, hd)
        return {"cls": cls, "received": received, "keys": keys}

    def vision_flops(self, grid_hw: tuple[int, int]) -> float:
        """Patch embedding, every CLIP block (the tower runs all of them; full attention over CLS + patches)
        and the two-layer projector, for a ``side x side`` grid."""
        from tokbench.metrics import vision_block_flops

        vision, text = self.model.config.vision_config, self.text_config
        patches = grid_hw[0] * grid_hw[1]
        length = patches + 1  # CLS
        embed = 2 * patches * vision.num_channels * vision.patch_size**2 * vision.hidden_size
        block = vision_block_flops(length, vision.hidden_size, vision.intermediate_size, 2, length**2)
        projector = 2 * patches * (vision.hidden_size * text.hidden_size + text.hidden_size**2)
        return float(embed + vision.num_hidden_layers * block + projector)


ADAPTER = LlavaAdapter
