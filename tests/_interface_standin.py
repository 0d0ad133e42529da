"""TEMPORARY stand-in for the family interface (issue #17, INTERFACE.md) on a branch whose base.py predates it.

Import it before a `tokbench.models.families` module. Where `tokbench.models.base` already has ``Tile`` (the
integrated core), it does nothing; else it installs the interface's ``Tile``/``VisualTokens``/
``PreparedBatch``/``ModelAdapter`` additions, ``ModelInfo`` with its new fields, and
``tiny.save_checkpoint``/``tiny.with_weights``. Delete it once the core lands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokbench import pruner
from tokbench.models import base, tiny

if not hasattr(base, "Tile"):

    @dataclass(frozen=True)
    class Tile:
        grid: tuple[int, int]
        box: tuple[float, float, float, float]

        @property
        def n_tokens(self) -> int:
            return self.grid[0] * self.grid[1]

    @dataclass
    class VisualTokens:
        embeds: Any
        tiles: list[Tile]
        vision_hidden: dict = field(default_factory=dict)
        extras: dict = field(default_factory=dict)

    @dataclass
    class PreparedBatch:
        input_ids: Any
        attention_mask: Any
        model_inputs: dict
        tiles: list[list[Tile]] = field(default_factory=list)

        def checked_tiles(self, image: int, grids: list[tuple[int, int]]) -> list[Tile]:
            tiles = self.tiles[image]
            if [t.grid for t in tiles] != [tuple(g) for g in grids]:
                raise RuntimeError(f"image {image}: tower grids {grids}, token_tiles {[t.grid for t in tiles]}")
            return tiles

    @dataclass(frozen=True)
    class ModelInfo:
        name: str
        n_layers: int
        hidden_size: int
        n_heads: int
        vision_depth: int
        vision_feature_layer: int
        vision_full_attention: tuple[int, ...]
        patches_per_token: int
        vision_hidden_size: int | None = None
        has_cls: bool = False
        tiles_per_image: int = 1
        position_rows: int = 1

        @property
        def vision_windowed(self) -> bool:
            return len(self.vision_full_attention) < self.vision_depth

    class ModelAdapter(base.ModelAdapter):
        tiny_models: dict = {}
        hub_configs: dict = {}

        def info(self):
            return self.info_from_config(self.model.config, self.name)

        def token_grid(self, image):
            raise NotImplementedError("the interface replaces token_grid with token_tiles")

        def n_visual_tokens(self, image) -> int:
            return sum(tile.n_tokens for tile in self.token_tiles(image))

        def preprocess(self, images, questions):
            batch = super().preprocess(images, questions)
            batch.tiles = [self.token_tiles(img) for imgs in images for img in imgs]
            return batch

    def save_checkpoint(path, model, processor):
        text = model.config.get_text_config()
        model.generation_config.eos_token_id = text.eos_token_id
        model.generation_config.pad_token_id = text.pad_token_id
        tiny._save_atomically(path, model, processor)
        return path

    base.Tile, base.VisualTokens, base.PreparedBatch = Tile, VisualTokens, PreparedBatch
    base.ModelAdapter = ModelAdapter
    pruner.ModelInfo = ModelInfo
    tiny.save_checkpoint, tiny.with_weights = save_checkpoint, tiny._with_weights
