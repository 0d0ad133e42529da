"""InternVL3 in the transformers format (`InternVLForConditionalGeneration`, e.g. ``OpenGVLab/InternVL3-8B-hf``):
InternViT (a CLS token plus 14 px patches, full attention in every block) + pixel shuffle (each 2x2 patch
square becomes one token) + MLP projector + Qwen2.

Dynamic tiling (the GotOcr2 image processor with ``crop_to_patches``, which the InternVL processor turns on):
among the grids of ``min_patches .. max_patches`` (1 .. 12) tiles of ``S`` px (448), the one whose aspect
ratio is closest to the image's (ties: more tiles while they cover at most twice the image's area); the
image is resized onto that canvas and cut in raster order, then a thumbnail of the whole image at ``S`` px
follows when there is more than one tile. Each tile gives ``(S / 14 / 2)^2`` tokens (256).

Visual tokens: ``<img>`` + one contiguous run of ``<IMG_CONTEXT>`` + ``</img>`` per image, its tiles in
processor order with no separator between them, raster order within a tile. Positions: 1-D RoPE ids
``0..L-1`` over the non-padding tokens, as ``generate`` computes them. A pruning port that drops tokens from
the sequence and lets the model number it again (the model counts ``0..`` over whatever it is given)
re-indexes; that is this family's default position policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from tokbench.models import tiny
from tokbench.models.base import ModelAdapter, PreparedBatch, Tile, VisualTokens, capture_blocks, downsampled_side
from tokbench.pruner import ModelInfo

MAX_TILES = 12  # the released -hf processors' max_patches (preprocessor_config.json); the thumbnail comes on top
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the released -hf processors' normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
_NAMED_SPECIALS = {  # the tokenizer attributes InternVLProcessor reads
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
_CHAT_TEMPLATE = (  # as transformers' InternVL conversion writes it: an image part is the image token and a newline
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _offline_processor(tile: int, patch: int, downsample_ratio: float = 0.5):
    """An InternVL processor over an offline byte-level tokenizer with ``tile`` px tiles; returns
    (processor, config fields naming its special tokens: image_token_id, eos_token_id, pad_token_id).

    As in the released -hf processors, the image processor's own ``crop_to_patches`` stays off: the InternVL
    processor turns it on for every call."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor, Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=tiny._byte_vocab(_SPECIALS), merges=[], extra_special_tokens=_NAMED_SPECIALS)
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIALS[1:3]})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    image_processor = GotOcr2ImageProcessor(
        size={"height": tile, "width": tile},
        min_patches=1,
        max_patches=MAX_TILES,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=_tokens_per_side(tile, patch, downsample_ratio) ** 2,
        chat_template=_CHAT_TEMPLATE,
    )
    ids = dict(
        image_token_id=tokenizer.context_image_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return processor, ids


def _tokens_per_side(tile: int, patch: int, downsample_ratio: float) -> int:
    """Tokens along one side of a ``tile`` px tile: its patches, fewer by the pixel shuffle."""
    return int(tile // patch * downsample_ratio)


def _shuffle_groups(states: torch.Tensor, side: int) -> torch.Tensor:
    """Patch states (T, side^2, ...) of T square tiles, raster order -> (T * (side/2)^2, 4, ...): one row per
    token in the pixel shuffle's order (tiles, then token rows and columns), its 2x2 patches in the order the
    shuffle concatenates them: (0, 0), (0, 1), (1, 0), (1, 1)."""
    tiles, rest = states.shape[0], states.shape[2:]
    half = side // 2
    grid = states.reshape(tiles, half, 2, half, 2, *rest).transpose(2, 3)  # (T, i, j, di, dj, ...)
    return grid.reshape(tiles * half * half, 4, *rest)


class InternVLAdapter(ModelAdapter):
    position_rows = 1
    default_position_policy = "reindex"
    tiny_models = {"tiny-internvl3": {}}
    hub_configs = {
        "OpenGVLab/InternVL3-1B-hf": "internvl3-1b",
        "OpenGVLab/InternVL3-2B-hf": "internvl3-2b",
        "OpenGVLab/InternVL3-8B-hf": "internvl3-8b",
    }

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def _patch(self) -> int:
        return self.model.config.vision_config.patch_size[0]

    @property
    def _tile(self) -> int:
        return self.processor.image_processor.size["height"]

    @classmethod
    def info_from_config(cls, config, name: str) -> ModelInfo:
        """``tiles_per_image``: the released processors' 12 tiles plus the thumbnail (the limit lives in the
        processor, not in the config)."""
        vision = config.vision_config
        depth = vision.num_hidden_layers
        return cls._info(
            config,
            name,
            vision_depth=depth,
            vision_feature_layer=config.vision_feature_layer,
            vision_full_attention=tuple(range(depth)),
            patches_per_token=round(1 / config.downsample_ratio) ** 2,
            vision_hidden_size=vision.hidden_size,
            has_cls=True,
            tiles_per_image=MAX_TILES + 1,
        )

    @classmethod
    def build_tiny(cls, path: Path, seed: int = 0, weights: Path | None = None) -> Path:
        """A tiny InternVL3: 112 px tiles of 14 px patches (16 tokens a tile, 13 tiles at most), a 4-block
        InternViT of width 32, a 4-layer Qwen2 of width 64."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        tile, patch = 112, 14
        processor, ids = _offline_processor(tile, patch)
        config = InternVLConfig(
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=64,
                attention_bias=True,
                image_size=[tile, tile],
                patch_size=[patch, patch],
            ),
            text_config=dict(
                model_type="qwen2",
                vocab_size=len(processor.tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=ids["eos_token_id"],
                pad_token_id=ids["pad_token_id"],
            ),
            image_token_id=ids["image_token_id"],
            image_seq_length=processor.image_seq_length,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = tiny.with_weights(InternVLForConditionalGeneration(config), weights)
        return tiny.save_checkpoint(path, model, processor)

    @classmethod
    def random_parts(cls, spec: dict, max_pixels: int | None):
        """The shipped spec's config over the offline processor (448 px tiles, 12 at most); ``max_pixels``
        does not apply (the tile count, not the resolution, is what varies)."""
        from transformers import InternVLConfig

        vision = spec["vision_config"]
        processor, ids = _offline_processor(vision["image_size"][0], vision["patch_size"][0], spec["downsample_ratio"])
        config = InternVLConfig(**spec, image_token_id=ids["image_token_id"])
        text = config.get_text_config()
        text.eos_token_id, text.pad_token_id = ids["eos_token_id"], ids["pad_token_id"]
        return config, processor

    # --- tiles ------------------------------------------------------------------------------------
    def token_tiles(self, image: Image.Image) -> list[Tile]:
        """The processor's tiles in its order, each covering its cell of the image's grid, then (more than one
        tile) the thumbnail over the whole image. An image from `resize_to_tokens` below one tile is one
        smaller tile."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        config = self.model.config
        side = image.info.get("tokbench_side")
        if side is not None:
            per_side = _tokens_per_side(side, self._patch, config.downsample_ratio)
            return [Tile((per_side, per_side), (0.0, 0.0, float(image.width), float(image.height)))]
        ip, tile = self.processor.image_processor, self._tile
        cols, rows = get_optimal_tiled_canvas((image.height, image.width), (tile, tile), ip.min_patches, ip.max_patches)
        per_side = _tokens_per_side(tile, self._patch, config.downsample_ratio)
        width, height = image.width / cols, image.height / rows
        tiles = [
            Tile((per_side, per_side), (c * width, r * height, (c + 1) * width, (r + 1) * height))
            for r in range(rows)
            for c in range(cols)
        ]
        if len(tiles) > 1:
            tiles.append(Tile((per_side, per_side), (0.0, 0.0, float(image.width), float(image.height))))
        return tiles

    def resize_to_tokens(self, image: Image.Image, n_tokens: int) -> Image.Image:
        """Fewer tiles, else one smaller tile.

        At least one tile's tokens: the processor's own grid when it fits; else the grid the processor would
        choose with fewer tiles allowed (the most that fit, thumbnail included), the image resized onto exactly
        that canvas (so the processor, with its usual limit, cuts the same grid). Below one tile: the whole
        image squeezed onto one square of ``28 * floor(sqrt(n_tokens))`` px, marked (``info["tokbench_side"]``)
        so that `preprocess` feeds it at that size; the tower interpolates its position table.
        """
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        ip, tile = self.processor.image_processor, self._tile
        if self.n_visual_tokens(image) <= n_tokens:
            return image
        per_tile = _tokens_per_side(tile, self._patch, self.model.config.downsample_ratio) ** 2
        for most in range(ip.max_patches - 1, 0, -1):
            cols, rows = get_optimal_tiled_canvas(
                (image.height, image.width), (tile, tile), min(ip.min_patches, most), most
            )
            if (cols * rows + (cols * rows > 1)) * per_tile > n_tokens:
                continue
            resized = image.resize((cols * tile, rows * tile), Image.BICUBIC)
            if self.n_visual_tokens(resized) <= n_tokens:
                return resized
        per_token = round(self._patch / self.model.config.downsample_ratio)
        side = per_token * max(1, math.isqrt(n_tokens))
        resized = image.convert("RGB").resize((side, side), Image.BICUBIC)
        resized.info["tokbench_side"] = side
        return resized

    def preprocess(self, images: list[list[Image.Image]], questions: list[str]) -> PreparedBatch:
        """As the base class; images shrunk below one tile by `resize_to_tokens` are fed as one tile of their
        own size (the processor's tile size and tokens per tile set to it for the call)."""
        side = downsampled_side(images)
        if side is None:
            return super().preprocess(images, questions)
        ip, processor = self.processor.image_processor, self.processor
        saved = (ip.size, processor.image_seq_length)
        ip.size = {"height": side, "width": side}
        processor.image_seq_length = _tokens_per_side(side, self._patch, self.model.config.downsample_ratio) ** 2
        try:
            return super().preprocess(images, questions)
        finally:
            ip.size, processor.image_seq_length = saved

    # --- vision -----------------------------------------------------------------------------------
    def project_vision(self, states: torch.Tensor) -> torch.Tensor:
        """(k, 4, d_v) feature-layer patch states, grouped as the pixel shuffle groups them -> (k, d): the
        tower's final norm (identity in InternVL3) when the feature layer is the last block, the 4 patches
        concatenated in shuffle order, the projector."""
        if self.model.config.vision_feature_layer == -1:
            states = self.vision_tower.layernorm(states)
        return self.model.model.multi_modal_projector(states.reshape(states.shape[0], -1))

    def encode_images(
        self, batch: PreparedBatch, vision_layers: tuple[int, ...] = (), attention_layers: tuple[int, ...] = ()
    ) -> list[VisualTokens]:
        """The model's own ``get_image_features`` over every tile of the batch, with hooks on the blocks asked for.

        Per image, over its T tiles: ``vision_hidden[layer]`` (n, 4, d_v) the block's patch outputs without CLS,
        grouped per token as the pixel shuffle groups them; ``extras["cls"][layer]`` (T, d_v) each tile's CLS
        output; ``extras["block_inputs"][layer]`` (T, 1 + 4 n / T, d_v) each tile's block input, CLS first.
        """
        blocks = self.vision_tower.encoder.layer
        depth = len(blocks)
        pixel_values = batch.model_inputs["pixel_values"].to(self.dtype)
        wanted_in, wanted_out = {v % depth for v in attention_layers}, {v % depth for v in vision_layers}
        with capture_blocks(blocks, wanted_in, wanted_out) as captured:
            out = self.model.model.get_image_features(pixel_values, return_dict=True)
        features = out.pooler_output  # (all tiles, tokens per tile, d)
        patch_side = pixel_values.shape[-1] // self._patch
        per_side = _tokens_per_side(pixel_values.shape[-1], self._patch, self.model.config.downsample_ratio)
        tokens, start = [], 0
        for i, tiles in enumerate(batch.tiles):
            span = slice(start, start + len(tiles))
            start += len(tiles)
            checked = batch.checked_tiles(i, [(per_side, per_side)] * len(tiles))
            states = {layer: captured[("out", layer % depth)][span] for layer in vision_layers}
            hidden = {layer: _shuffle_groups(s[:, 1:], patch_side) for layer, s in states.items()}
            extras: dict = {"cls": {layer: s[:, 0] for layer, s in states.items()}}
            if attention_layers:
                extras["block_inputs"] = {layer: captured[("in", layer % depth)][span] for layer in attention_layers}
            tokens.append(VisualTokens(features[span].reshape(-1, features.shape[-1]), checked, hidden, extras))
        return tokens

    def _attention_stats(self, layer: int, block_input: torch.Tensor, tokens: VisualTokens) -> dict[str, torch.Tensor]:
        """Block ``layer``'s attention within each tile, from its input (T, 1 + P, d_v): the CLS query's row
        ``cls`` (h, n) and ``received`` (n,), each a token's mean over its 4 patches, tiles concatenated; the
        keys (n, 4, h, hd). Queries and keys pass the block's q/k norms (identity unless ``use_qk_norm``)."""
        from tokbench.attention import attention_received

        block = self.vision_tower.encoder.layer[layer % len(self.vision_tower.encoder.layer)]
        attn = block.attention
        normed = block.layernorm_before(block_input)
        tiles, length, _ = normed.shape
        query = attn.q_norm(attn.q_proj(normed)).view(tiles, length, attn.num_heads, -1).transpose(1, 2)
        key = attn.k_norm(attn.k_proj(normed)).view(tiles, length, attn.num_heads, -1).transpose(1, 2)  # (T, h, 1+P, *)
        cls = (query[:, :, :1].float() @ key.float().transpose(-1, -2) * attn.scale).softmax(-1)[:, :, 0, 1:]
        received = torch.stack([attention_received(q, k, attn.scale)[1:] for q, k in zip(query, key)])  # (T, P)
        side = math.isqrt(length - 1)
        return {
            "cls": _shuffle_groups(cls.transpose(1, 2), side).mean(dim=1).T,  # (h, n)
            "received": _shuffle_groups(received, side).mean(dim=1),
            "keys": _shuffle_groups(key[:, :, 1:].transpose(1, 2), side),  # (n, 4, h, hd)
        }

    def vision_flops(self, grid_hw: tuple[int, int]) -> float:
        """One tile: patch embedding, every InternViT block (full attention over CLS + patches; two-matmul
        MLP) and the projector (LayerNorm, then 4 d_v -> d -> d) over the tile's tokens."""
        from tokbench.metrics import vision_block_flops

        vision, text = self.model.config.vision_config, self.text_config
        tokens = grid_hw[0] * grid_hw[1]
        unit = round(1 / self.model.config.downsample_ratio) ** 2
        patches = tokens * unit
        length = patches + 1  # CLS
        embed = 2 * patches * vision.num_channels * self._patch**2 * vision.hidden_size
        block = vision_block_flops(length, vision.hidden_size, vision.intermediate_size, 2, length**2)
        projector = 2 * tokens * (unit * vision.hidden_size * text.hidden_size + text.hidden_size**2)
        return float(embed + vision.num_hidden_layers * block + projector)


ADAPTER = InternVLAdapter
