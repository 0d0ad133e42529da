"""Everything model-specific, behind one small interface: one `ModelAdapter` subclass per family.

A family is one module ``tokbench/models/families/<model_type>.py`` (the file name is the checkpoint's
``config.model_type``) whose ``ADAPTER`` names its adapter class; the registry finds it by that name.
The adapter owns: the config-only facts (`ModelAdapter.info_from_config`), the offline tiny and
real-size random models, running what happens between decoder layers (`after_layer`), the query/key
projections that selection scores are computed from (`project_queries`, `project_keys`), the vision
tower's outputs and attention statistics, each image's token tiles and the pixels they cover, and
position ids. docs/architecture.md lists the steps to add a family.

Notation: ``b`` batch, ``L`` sequence length, ``n`` visual tokens of one image (all its tiles), ``d`` LLM
hidden size, ``d_v`` vision hidden size, ``u`` vision patches per LLM token, ``P`` position rows (3 for
M-RoPE, 1 for 1-D RoPE), ``h``/``h_kv`` query/key heads, ``hd`` head dim, ``T`` tiles of one image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from tokbench.pruner import ModelInfo


@dataclass(frozen=True)
class Tile:
    """One token grid of an image: ``grid`` (rows, cols) tokens covering the pixel ``box`` (x0, y0, x1, y1)
    of the image as given (before the processor resizes or crops it). Most families make one tile per
    image; tiling families (InternVL) make several, then a thumbnail whose box is the whole image."""

    grid: tuple[int, int]
    box: tuple[float, float, float, float]

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def as_row(self) -> list[float]:
        """[rows, cols, x0, y0, x1, y1], as ``--save-masks`` records store it."""
        return [*self.grid, *self.box]

    @classmethod
    def from_row(cls, row: list[float]) -> Tile:
        rows, cols, *box = row
        return cls((int(rows), int(cols)), tuple(box))


@dataclass
class VisualTokens:
    """One image's visual tokens in LLM input space.

    embeds (Tensor, (n, d)): projected visual tokens, its tiles in order, raster order within a tile.
    tiles (list[Tile]): the image's token grids (n == sum of rows * cols).
    vision_hidden (dict[int, Tensor (n, u, d_v)]): vision-tower block outputs, in the same token order.
    extras (dict): ``cls`` (dict[int, Tensor (T, d_v)]: each tile's CLS output) for towers with a CLS
        token; ``deepstack`` (list of Tensor (n, d)) for Qwen3-VL; ``block_inputs`` (dict[int,
        Tensor]) the inputs of the blocks whose attention statistics were asked for, until
        `ModelAdapter.vision_attention` turns them into ``vision_attention`` (dict[int, dict[str, Tensor]])
        per block: ``received`` (n,) attention each token receives (sum over heads, mean over queries,
        mean over its ``u`` patches), ``keys`` (n, u, h, hd) the block's attention keys, and for CLIP
        ``cls`` (h, n) the CLS query's attention.
    """

    embeds: torch.Tensor
    tiles: list[Tile]
    vision_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedBatch:
    """Processor outputs for a batch, left padded.

    input_ids (LongTensor, (b, L)); attention_mask (LongTensor, (b, L));
    model_inputs (dict): the pixel tensors and grids the vision tower takes.
    tiles (list[list[Tile]]): each image's tiles (`ModelAdapter.token_tiles`), images in batch order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    model_inputs: dict[str, torch.Tensor]
    tiles: list[list[Tile]] = field(default_factory=list)

    def checked_tiles(self, image: int, grids: list[tuple[int, int]]) -> list[Tile]:
        """Image ``image``'s tiles, checked against the ``grids`` the vision tower actually produced."""
        tiles = self.tiles[image]
        if [t.grid for t in tiles] != [tuple(g) for g in grids]:
            raise RuntimeError(f"image {image}: the tower produced grids {grids}, token_tiles said {[t.grid for t in tiles]}")
        return tiles


class ModelAdapter(ABC):
    """A loaded model plus everything family-specific the engine and the tools use."""

    position_rows: ClassVar[int]  # P
    default_position_policy: ClassVar[str]  # "keep" (original ids) or "reindex" (contiguous after a drop)
    tiny_models: ClassVar[dict[str, dict[str, Any]]] = {}  # tiny model name -> `build_tiny` keyword arguments
    hub_configs: ClassVar[dict[str, str]] = {}  # hub id -> shipped real-size config (``configs/<name>.json``)

    def __init__(self, model, processor, name: str):
        self.model = model
        self.processor = processor
        self.name = name
        self.tokenizer = processor.tokenizer

    @property
    def family(self) -> str:
        """The checkpoint's ``model_type``, which names this adapter's module."""
        return self.model.config.model_type

    # --- config-only facts and offline models ----------------------------------------------------
    @classmethod
    @abstractmethod
    def info_from_config(cls, config, name: str) -> ModelInfo:
        """The facts a method may use, from the transformers config alone (checked before weights load)."""

    @classmethod
    def _info(cls, config, name: str, **vision_facts) -> ModelInfo:
        """`ModelInfo` with the LLM's facts from ``config``'s text config and the family's vision facts."""
        text = config.get_text_config()
        return ModelInfo(
            name=name,
            n_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            n_heads=text.num_attention_heads,
            position_rows=cls.position_rows,
            **vision_facts,
        )

    def info(self) -> ModelInfo:
        return self.info_from_config(self.model.config, self.name)

    @classmethod
    @abstractmethod
    def build_tiny(cls, path: Path, seed: int = 0, weights: Path | None = None, **kwargs) -> Path:
        """Write a complete tiny checkpoint (config, weights, offline tokenizer, processor) to ``path``
        with `tokbench.models.tiny.save_checkpoint`; ``weights``: a safetensors state dict to load."""

    @classmethod
    @abstractmethod
    def random_parts(cls, spec: dict[str, Any], max_pixels: int | None) -> tuple[Any, Any]:
        """(config, processor) of a shipped real-size spec (``model_type`` removed) over the offline tokenizer,
        special-token ids set."""

    def configure_processor(self, max_pixels: int | None) -> None:
        """Apply ``--max-pixels`` to the processor (families with dynamic resolution)."""

    def decode_pixel_cap(self, grid_factor: int) -> int | None:
        """The most pixels the processor keeps of an image when it resizes with ``smart_resize`` on a
        ``grid_factor``-pixel grid (images may then be decoded no larger, `tokbench.images`); None otherwise."""
        return None

    # --- the language model -------------------------------------------------------------------
    @property
    def text_model(self) -> torch.nn.Module:
        """The decoder stack: ``.embed_tokens``, ``.layers``, ``.norm``, ``.rotary_emb`` (where transformers
        puts it in every VLM it ships: ``model.model.language_model``)."""
        return self.model.model.language_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.text_model.layers

    @property
    def n_layers(self) -> int:
        return len(self.text_model.layers)

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def project_queries(self, layer: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Decoder ``layer``'s queries before rotary embedding: normed (b, L, d) -> (b, h, L, hd)."""
        attn = layer.self_attn
        b, length, _ = normed.shape
        return attn.q_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)

    def project_keys(self, layer: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Decoder ``layer``'s keys before rotary embedding: normed (b, L, d) -> (b, h_kv, L, hd)."""
        attn = layer.self_attn
        b, length, _ = normed.shape
        return attn.k_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)

    def after_layer(
        self, index: int, hidden: torch.Tensor, visual_index: torch.Tensor, visual: list[list[VisualTokens]]
    ) -> torch.Tensor:
        """What the model does between decoder layer ``index`` and the next in prefill (nothing by default).

        hidden (b, L, d); visual_index (LongTensor, (b, L)): each position's index into its sample's original
        visual tokens (images and tiles concatenated), -1 for text; visual: per sample, per image.
        """
        return hidden

    def layer_device(self, index: int) -> torch.device:
        """The device decoder layer ``index`` runs on (they differ under ``--device-map auto``)."""
        return next(self.layers[index].parameters()).device

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(b, d) final hidden states (after the last layer, before the norm) -> (b, vocab) logits."""
        head = self.model.lm_head
        return head(self.text_model.norm(hidden_states.to(head.weight.device)))

    def rotary(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``position_ids`` (P, b, L) in the layout the decoder layers take."""
        if self.position_rows == 1:
            return self.text_model.rotary_emb(hidden_states, position_ids[0])
        return self.text_model.rotary_emb(hidden_states, position_ids)

    # --- inputs ------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def build_prompt(self, question: str, n_images: int = 1) -> str:
        """The chat-formatted prompt with ``n_images`` image slots before the question."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def preprocess(self, images: list[list[Image.Image]], questions: list[str]) -> PreparedBatch:
        """Tokenise a batch (left padded) and turn its images into pixel tensors."""
        self.tokenizer.padding_side = "left"
        prompts = [self.build_prompt(q, len(imgs)) for q, imgs in zip(questions, images)]
        flat = [img for imgs in images for img in imgs]
        out = self.processor(text=prompts, images=flat or None, return_tensors="pt", padding=True)
        out = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        input_ids, attention_mask = out.pop("input_ids"), out.pop("attention_mask")
        return PreparedBatch(input_ids, attention_mask, out, [self.token_tiles(img) for img in flat])

    @abstractmethod
    def encode_images(
        self, batch: PreparedBatch, vision_layers: tuple[int, ...] = (), attention_layers: tuple[int, ...] = ()
    ) -> list[VisualTokens]:
        """Run the vision tower (and projector) once for the batch; one entry per image, batch order.

        ``vision_layers``: blocks whose outputs to return; ``attention_layers``: blocks whose inputs to
        keep (``extras["block_inputs"]``) for `vision_attention`. Only these blocks' states are kept.
        """

    def vision_attention(self, visual: list[VisualTokens]) -> None:
        """Turn each image's kept block inputs into its attention statistics (``extras["vision_attention"]``),
        recomputed from the block's input, never as a stored full map. Selection work: the engine times
        it under ``select``."""
        for tokens in visual:
            inputs = tokens.extras.pop("block_inputs", {})
            if inputs:
                tokens.extras["vision_attention"] = {
                    layer: self._attention_stats(layer, state, tokens) for layer, state in inputs.items()
                }

    def _attention_stats(self, layer: int, block_input: torch.Tensor, tokens: VisualTokens) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no vision attention statistics")

    @abstractmethod
    def vision_flops(self, grid_hw: tuple[int, int]) -> float:
        """Analytic FLOPs of the vision tower and projector for one tile whose token grid is ``grid_hw``
        (`tokbench.metrics.vision_block_flops` per block, plus patch embedding and projector); an image
        costs the sum over its tiles."""

    def initial_position_ids(self, batch: PreparedBatch) -> torch.Tensor:
        """The unpruned position ids (P, b, L) the model itself would use for this batch. Default, for 1-D
        RoPE families (P = 1): ``0..`` over each sample's non-padding tokens (0 on padding), as ``generate``
        makes them; M-RoPE families override it with the model's own rope index."""
        positions = batch.attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[None]

    @abstractmethod
    def token_tiles(self, image: Image.Image) -> list[Tile]:
        """The token tiles this model produces for ``image`` and the pixels each covers, without running it."""

    @abstractmethod
    def resize_to_tokens(self, image: Image.Image, n_tokens: int) -> Image.Image:
        """``image`` resized so that the model produces at most ``n_tokens`` visual tokens."""

    @abstractmethod
    def project_vision(self, states: torch.Tensor) -> torch.Tensor:
        """Vision-feature-layer states (k, u, d_v) -> LLM-space tokens (k, d), through the projector."""

    def n_visual_tokens(self, image: Image.Image) -> int:
        return sum(tile.n_tokens for tile in self.token_tiles(image))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "class": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attn_implementation": self.model.config._attn_implementation,
            "n_layers": self.n_layers,
        }


def downsampled_side(images: list[list[Image.Image]]) -> int | None:
    """The one side (px) that `ModelAdapter.resize_to_tokens` shrank every image of a batch to
    (``info["tokbench_side"]``), None when it shrank none; ValueError when the batch mixes sizes, since a
    fixed-size tower takes one input size per call."""
    sides = {img.info.get("tokbench_side") for imgs in images for img in imgs}
    if sides == {None}:
        return None
    if len(sides) != 1:
        raise ValueError(
            "a batch mixes images downsampled to different sizes, or with full-size ones (the tower takes one "
            "size per call); use one budget per batch, or downsample with batch size 1"
        )
    (side,) = sides
    return side


@contextmanager
def capture_blocks(
    blocks: torch.nn.ModuleList, inputs: set[int], outputs: set[int]
) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Keep the hidden states entering (``("in", i)``) and leaving (``("out", i)``) the chosen blocks
    of a tower's forward pass, through hooks, instead of every block's output."""
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i in inputs:
        def keep_input(module, args, kwargs, i=i):
            captured[("in", i)] = args[0] if args else kwargs["hidden_states"]

        handles.append(blocks[i].register_forward_pre_hook(keep_input, with_kwargs=True))
    for i in outputs:
        def keep_output(module, args, output, i=i):
            captured[("out", i)] = output[0] if isinstance(output, tuple) else output

        handles.append(blocks[i].register_forward_hook(keep_output))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
