"""What the engine needs to know about a model family, behind one small interface.

Notation: ``b`` batch, ``L`` sequence length, ``n`` visual tokens of one image, ``d`` LLM hidden size,
``d_v`` vision hidden size, ``u`` vision patches per LLM token, ``P`` position rows (3 for
Qwen2.5-VL's M-RoPE, 1 for LLaVA's 1-D RoPE).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from tokbench.pruner import ModelInfo


@dataclass
class VisualTokens:
    """One image's visual tokens in LLM input space.

    embeds (Tensor, (n, d)): projected visual tokens, raster order over the token grid.
    grid_hw (tuple[int, int]): token grid rows x cols (n == rows * cols).
    vision_hidden (dict[int, Tensor (n, u, d_v)]): vision-tower block outputs, in the same token order.
    extras (dict): ``cls`` (dict[int, Tensor (d_v,)]) for CLIP towers; ``block_inputs`` (dict[int,
        Tensor]) the inputs of the blocks whose attention statistics were asked for, until
        `ModelAdapter.vision_attention` turns them into ``vision_attention`` (dict[int, dict[str, Tensor]])
        per block: ``received`` (n,) attention each token receives (sum over heads, mean over queries,
        mean over its ``u`` patches), ``keys`` (n, u, h, hd) the block's attention keys, and for CLIP
        ``cls`` (h, n) the CLS query's attention.
    """

    embeds: torch.Tensor
    grid_hw: tuple[int, int]
    vision_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedBatch:
    """Processor outputs for a batch, left padded.

    input_ids (LongTensor, (b, L)); attention_mask (LongTensor, (b, L));
    model_inputs (dict): the pixel tensors and grids the vision tower takes.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    model_inputs: dict[str, torch.Tensor]


class ModelAdapter(ABC):
    """A loaded model plus the few family-specific facts the engine uses."""

    family: str
    position_rows: int  # P
    default_position_policy: str  # "keep" (original ids) or "reindex" (contiguous after a drop)

    def __init__(self, model, processor, name: str):
        self.model = model
        self.processor = processor
        self.name = name
        self.tokenizer = processor.tokenizer

    # --- the language model -------------------------------------------------------------------
    @property
    @abstractmethod
    def text_model(self) -> torch.nn.Module:
        """The decoder stack: ``.embed_tokens``, ``.layers``, ``.norm``, ``.rotary_emb``."""

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

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(b, d) final hidden states (after the last layer, before the norm) -> (b, vocab) logits."""
        return self.model.lm_head(self.text_model.norm(hidden_states))

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
        return PreparedBatch(input_ids, attention_mask, out)

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
        """Analytic FLOPs of the vision tower and projector for one image whose token grid is ``grid_hw``
        (`tokbench.metrics.vision_block_flops` per block, plus patch embedding and projector)."""

    @abstractmethod
    def initial_position_ids(self, batch: PreparedBatch) -> torch.Tensor:
        """The unpruned position ids (P, b, L) the model itself would use for this batch."""

    @abstractmethod
    def token_grid(self, image: Image.Image) -> tuple[int, int]:
        """Token grid (rows, cols) this model produces for ``image``, without running it."""

    @abstractmethod
    def resize_to_tokens(self, image: Image.Image, n_tokens: int) -> Image.Image:
        """``image`` resized so that the model produces at most ``n_tokens`` visual tokens."""

    @abstractmethod
    def info(self) -> ModelInfo:
        """The facts a method may use to choose its stages."""

    @abstractmethod
    def project_vision(self, states: torch.Tensor) -> torch.Tensor:
        """Vision-feature-layer states (k, u, d_v) -> LLM-space tokens (k, d), through the projector."""

    def n_visual_tokens(self, image: Image.Image) -> int:
        rows, cols = self.token_grid(image)
        return rows * cols

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "class": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attn_implementation": self.model.config._attn_implementation,
            "n_layers": self.n_layers,
        }


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
