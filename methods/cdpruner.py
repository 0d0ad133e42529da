"""`cdpruner`: CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967), Sec. 3 (conditional DPP).

Notation: ``n`` visual tokens, ``k`` kept, ``d`` LLM hidden size, ``d_v`` vision width, ``p`` CLIP
projection size, ``m`` instruction tokens (or CLIP text segments).

Keeps visual tokens that are both diverse and relevant to the instruction, by MAP inference of a
conditional DPP, as Theia-4869/CDPruner ``llava/model/llava_arch.py`` (``encode_images``) does:

* similarity S = cos(X, X) of the projected visual tokens X (LLM input space), in float32;
* relevance r of each token to the instruction, min–max normalised as ``(r − min + 1e-6) / (max − min)``
  (Sec. 3.3);
* conditional kernel L = diag(r) · S · diag(r) (the official ``exp(α r)``, θ = 0.5 variant is commented out
  there and not used);
* greedy MAP with incremental Cholesky updates (Chen et al., NeurIPS 2018) for exactly
  ``budget`` steps; kept tokens in original order.

Relevance (``relevance`` arg):

* ``clip`` — the official LLaVA recipe (``llava/model/multimodal_encoder/clip_encoder.py``): image
  embeddings = CLIP ``visual_projection(post_layernorm(h))`` of the layer −2 patch states h (the stage
  reads them from the model's own tower, which *is* CLIP ViT-L/14-336 in LLaVA-1.5); text embeddings =
  the CLIP text tower (with projection) on the question tokenised *with* BOS/EOS, zero-padded to a
  multiple of 77 and split into 77-token segments (attention mask 0 on the padding); r = mean over
  segments of the *negated* cosine — the official code negates it (the authors see CLIP patch/text
  similarity inverted and "have only observed it in CLIP", CDPruner issue #14). Like the official eval
  scripts (``llava/eval/model_vqa_loader.py``, ``model_vqa_science.py``), the answer-format suffixes in
  ``_ANSWER_FORMATS`` are removed from the question first. CLIP weights come from ``clip`` (hub id or
  local path), loaded once when the method's stages are built and cached on the instance.
* ``embeds`` — Qwen2.5-VL (results published without code, CDPruner issues #3/#4/#18): r = mean over
  the question's tokens of cos(visual token, token embedding), both in the LLM's input space, min–max
  normalised, not negated (no CLIP sign effect to match; OpenVINO GenAI's Qwen2-VL port also uses
  un-negated LLM-embedding relevance, with one mean-pooled instruction embedding).
* ``auto`` (default) — ``clip`` on a CLIP-style tower (``has_cls`` and ``patches_per_token == 1``: LLaVA),
  ``embeds`` on any other (Qwen2.5-VL). ``clip`` needs such a tower: it projects one tower patch state per
  token with CLIP's own ``post_layernorm`` + ``visual_projection``.

Budget: exactly ``budget_count`` tokens (the official ``visual_token_num``): LLaVA-1.5 settings
``--budget 64|128|192``; Qwen2.5-VL ``--budget 128`` (the published 1296 → 128 setting) or ``--ratio r``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tokbench.pruner import (
    Budget,
    KeepDecision,
    MethodError,
    ModelInfo,
    Pruner,
    Stage,
    StageInputs,
    StageSpec,
    is_dynamic,
    register_method,
)

_ANSWER_FORMATS = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)


def dpp_greedy_order(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP picks of a DPP, in pick order. kernel (n, n) PSD -> LongTensor (min(k, n),).

    Each step adds argmax_j d_j² — the gain det(L_{S+j}) / det(L_S) — and updates every d_j² by the new
    Cholesky row e = (L[j*] − Cᵀ C[:, j*]) / d_{j*}: O(n·step) per step, no host sync. Runs in float64;
    once the kernel's rank is used up, remaining gains may be ≤ 0 or NaN: they are clamped / ranked last.
    """
    kernel = kernel.double()
    n = kernel.shape[0]
    k = min(k, n)
    factors = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)  # rows of the Cholesky factor C
    gains = kernel.diagonal().clone()  # (n,) d_j²
    order = torch.zeros(k, dtype=torch.long, device=kernel.device)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    for step in range(k):
        ranked = torch.nan_to_num(gains, nan=-1e300, posinf=1e300, neginf=-1e300)
        pick = ranked.masked_fill(taken, float("-inf")).argmax().view(1)  # never a token twice
        order[step] = pick[0]
        taken[pick] = True
        done = factors[:step]  # (step, n)
        row = kernel.index_select(0, pick)[0] - done.T @ done.index_select(1, pick)[:, 0]
        e = torch.nan_to_num(row / gains.index_select(0, pick).clamp_min(1e-12).sqrt())
        factors[step] = e
        gains = gains - e * e
    return order


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP subset, sorted (original token order). kernel (n, n) -> LongTensor (min(k, n),) on CPU."""
    if k >= kernel.shape[0]:
        return torch.arange(kernel.shape[0])
    return dpp_greedy_order(kernel, k).sort().values.cpu()


def min_max(x: torch.Tensor) -> torch.Tensor:
    """The official normalisation ``(x − min + 1e-6) / (max − min)``; all-equal inputs give ones."""
    span = x.max() - x.min()
    if span <= 0:
        return torch.ones_like(x)
    return (x - x.min() + 1e-6) / span


def strip_answer_format(question: str) -> str:
    """Remove the benchmark answer-format suffixes the official eval scripts strip before CLIP."""
    for suffix in _ANSWER_FORMATS:
        question = re.sub(r"\s*" + re.escape(suffix), "", question)
    return question.strip()


@dataclass
class _Clip:
    """The CLIP pieces relevance needs (the rest of the CLIP vision tower is dropped after loading)."""

    tokenizer: Any
    text_model: torch.nn.Module
    text_projection: torch.nn.Module
    post_layernorm: torch.nn.Module
    visual_projection: torch.nn.Module
    segment: int  # text positions per segment (max_position_embeddings, 77)


@register_method("cdpruner")
@dataclass
class CDPruner(Pruner):
    """Conditional-DPP pruning before the LLM. See the module docstring for rules and defaults."""

    budget: Budget | None
    relevance: str = "auto"  # auto | clip | embeds
    clip: str = "openai/clip-vit-large-patch14-336"
    version = "2"  # 2: official CLIP tokenisation (BOS/EOS, 77-token segments), +1e-6 min-max, answer formats stripped
    headline_retention = "input"
    _clip: _Clip | None = field(default=None, init=False, repr=False)

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if is_dynamic(self.budget):
            raise MethodError("cdpruner keeps a fixed number of tokens; pass --ratio or --budget")
        if self.relevance not in ("auto", "clip", "embeds"):
            raise MethodError(f"cdpruner: relevance={self.relevance!r}; use auto, clip or embeds")
        clip_tower = model.has_cls and model.patches_per_token == 1
        source = self.relevance if self.relevance != "auto" else ("clip" if clip_tower else "embeds")
        if source == "embeds":
            return [StageSpec(Stage.EMBED)]
        if not clip_tower:
            raise MethodError(
                "cdpruner: relevance=clip needs a CLIP vision tower (a CLS token, one patch per token, as LLaVA's); "
                "use relevance=embeds"
            )
        if not self.clip.strip():
            raise MethodError("cdpruner: relevance=clip needs a CLIP checkpoint; pass --method-arg clip=PATH or relevance=embeds")
        self._load_clip()
        return [StageSpec(Stage.VISION, vision_layers=(model.vision_feature_layer,))]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return min(inputs.budget_count, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        x = F.normalize(inputs.visual_embeds.float(), dim=-1)  # (n, d)
        similarity = x @ x.T  # (n, n)
        if spec.stage == Stage.VISION:  # relevance=clip
            patches = inputs.vision_hidden[spec.vision_layers[0]][:, 0]  # (n, u=1, d_v) -> (n, d_v)
            cosine = self.clip_cosine(patches, inputs.question)  # (n, segments)
            relevance = min_max(-cosine.mean(dim=1))
        elif inputs.instruction_embeds is None or inputs.instruction_embeds.shape[0] == 0:
            relevance = torch.ones(x.shape[0], device=x.device)  # no instruction: plain diversity DPP
        else:
            words = F.normalize(inputs.instruction_embeds.float(), dim=-1)  # (m, d)
            relevance = min_max((x @ words.T).mean(dim=1))
        kernel = relevance[:, None] * similarity * relevance[None, :]  # diag(r) S diag(r)
        return KeepDecision(dpp_greedy_map(kernel, self.stage_count(spec, inputs)), scores=relevance)

    @torch.no_grad()
    def clip_cosine(self, patch_states: torch.Tensor, question: str) -> torch.Tensor:
        """(n, segments) cosine of CLIP image embeddings of the patches with the question's text segments."""
        clip = self._load_clip()
        vision_width = clip.post_layernorm.normalized_shape[0]
        if patch_states.shape[-1] != vision_width:
            raise MethodError(
                f"cdpruner: CLIP {self.clip!r} has vision width {vision_width} but the model's tower gives "
                f"{patch_states.shape[-1]}; pass --method-arg clip=PATH to the tower's own CLIP"
            )
        device = patch_states.device
        if next(clip.text_model.parameters()).device != device:
            for module in (clip.text_model, clip.text_projection, clip.post_layernorm, clip.visual_projection):
                module.to(device)
        dtype = next(clip.visual_projection.parameters()).dtype
        image = clip.visual_projection(clip.post_layernorm(patch_states.to(dtype)))  # (n, p)
        tokens = clip.tokenizer(text=strip_answer_format(question), return_tensors="pt")  # with BOS/EOS
        length = tokens.input_ids.shape[1]
        segments = (length - 1) // clip.segment + 1
        pad = segments * clip.segment - length
        ids, mask = (F.pad(t, (0, pad), value=0).view(segments, clip.segment).to(device)
                     for t in (tokens.input_ids, tokens.attention_mask))
        pooled = clip.text_model(input_ids=ids, attention_mask=mask).pooler_output  # (segments, d_text)
        text = clip.text_projection(pooled)  # (segments, p)
        return F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T

    def _load_clip(self) -> _Clip:
        if self._clip is None:
            from transformers import CLIPModel, CLIPTokenizer

            try:
                model = CLIPModel.from_pretrained(self.clip).eval()
                tokenizer = CLIPTokenizer.from_pretrained(self.clip)
            except (OSError, ValueError) as err:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
                raise MethodError(
                    f"cdpruner: cannot load CLIP {self.clip!r} for relevance ({reason}); pass "
                    "--method-arg clip=PATH to a local CLIP checkpoint or --method-arg relevance=embeds"
                ) from None
            self._clip = _Clip(
                tokenizer,
                model.text_model,
                model.text_projection,
                model.vision_model.post_layernorm,
                model.visual_projection,
                model.config.text_config.max_position_embeddings,
            )
        return self._clip
