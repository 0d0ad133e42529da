"""`visionzip`: VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467), Sec. 4.1-4.2.

Notation: ``n`` visual tokens of the sample, ``u`` vision patches per LLM token (1 CLIP, 4 Qwen2.5-VL),
``d`` LLM hidden size, ``d_v`` vision hidden size, ``h`` vision heads, ``hd`` head dim, ``K`` budget,
``D`` dominant, ``C`` contextual tokens (``K = D + C``).

Acts once, at the vision block whose output feeds the projector (the feature layer: LLaVA-1.5 CLIP
block -2, Qwen2.5-VL the last block). Text-agnostic.

1. Dominant tokens (Sec. 4.1): the ``D`` tokens with the largest attention score, kept unchanged.
   CLIP: the CLS query's attention to each patch, summed over heads (official ``clip_encoder.py``);
   without a CLS token: the attention each token receives (``received``), as the authors' Qwen2.5-VL
   port scores it (mean over heads, sum over queries, mean over the token's ``u`` patches: the same
   ranking as ``received``).
2. Contextual tokens (Sec. 4.2): the remaining ``n - D`` tokens, in raster order, get ``C`` anchors
   at a uniform stride ``max(1, (n - D) // C)`` (the first ``C`` of ``0, step, 2 step, ...``); every
   other remaining token joins the anchor whose key at the same block is most similar (cosine); each
   anchor becomes ``anchor + mean(members)`` (unchanged when it has none).

Two variants (method argument ``variant``), differing in the key, the space the merge happens in and
the default split (docs/methods/visionzip.md):
- ``llm``: the authors' Qwen2.5-VL port (dvlab-research/VisionZip ``Qwen2_5_VL/qwen2_5vl_visionzip.py``,
  commit 68993a3): one key per token, averaged over its ``u`` patches and the heads; merging acts on
  the visual tokens in LLM space, after the merger (`KeepDecision.states`); ``C = max(1, int(0.05 n))``
  (the port's ``contextual_num``), ``D = K - C``.
- ``vision``: the original CLIP recipe (``visionzip/utils.py``, ``clip_encoder.py``): the head-averaged
  keys of a token's ``u`` patches concatenated; merging acts on the ``(u, d_v)`` feature-layer states,
  which are then projected (`KeepDecision.vision_states`); ``C = round(K * 10/64)``, ``D = K - C``
  (64 = 54 + 10, 192 = 162 + 30, LLaVA-NeXT 160 = 135 + 25).
``auto`` (default) picks ``llm`` where a token is several patches (``patches_per_token > 1``), else
``vision`` (where ``u = 1`` both keys coincide and merging before the projector is the official LLaVA
code). The choice travels in the stage spec: ``llm`` asks for no vision block outputs.
``contextual_ratio`` (C / K) overrides either default split; at least one token stays dominant.
Kept tokens stay at their raster positions, contextual tokens at their anchor's (as the port does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokbench.pruner import (
    Budget,
    KeepDecision,
    MethodError,
    ModelInfo,
    Stage,
    StageInputs,
    StageSpec,
    register_method,
)

VARIANTS = ("auto", "llm", "vision")
CLIP_CONTEXTUAL_RATIO = 10 / 64  # C / K: 54 + 10 of 64 (official README)
PORT_CONTEXTUAL_SHARE = 0.05  # C / n: the Qwen2.5-VL port's contextual_num = max(int(0.05 n), 1)


def split_budget(total: int, contextual_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) for ``total`` kept tokens: ``64 -> (54, 10)``, ``192 -> (162, 30)``."""
    contextual = min(total - 1, round(total * contextual_ratio)) if total > 1 else 0
    return total - contextual, max(0, contextual)


def split_port(total: int, n: int) -> tuple[int, int]:
    """The Qwen2.5-VL port's split of ``total`` kept tokens out of ``n``: ``C = max(1, int(0.05 n))``,
    capped so one token stays dominant. ``n = 1000``: ``100 -> (50, 50)``, ``700 -> (650, 50)``."""
    contextual = min(total - 1, max(1, int(PORT_CONTEXTUAL_SHARE * n)))
    return total - contextual, max(0, contextual)


def dominant_scores(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) score per token: CLS attention summed over heads (CLIP), else attention received."""
    if "cls" in stats:
        return stats["cls"].float().sum(dim=0)  # (h, n) -> (n,)
    return stats["received"].float()


def contextual_merge(
    hidden: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the non-dominant tokens ``rest`` into ``contextual`` uniformly spaced anchors.

    hidden (Tensor, (n, ...)): states to merge, (n, d) or (n, u, d_v); keys (Tensor, (n, f)): similarity
    features; rest (LongTensor, (r,)): non-dominant token indices in ascending order.
    Returns anchor indices (LongTensor, (contextual,)) and their merged states (contextual, ...).

    Example: rest = [2, 3, 4, 5, 6, 7, 8, 9], contextual = 2 -> step 4, anchors [2, 6]; members
    [3, 4, 5, 7, 8, 9] each join the anchor with the most similar key; anchor 2 with members 3, 4
    becomes h2 + (h3 + h4) / 2.
    """
    step = max(1, rest.numel() // contextual)
    local = torch.arange(0, rest.numel(), step, device=rest.device)[:contextual]  # positions within `rest`
    is_anchor = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_anchor[local] = True
    anchors, members = rest[is_anchor], rest[~is_anchor]
    similarity = F.normalize(keys[members], dim=-1) @ F.normalize(keys[anchors], dim=-1).T  # (m, C)
    assign = similarity.argmax(dim=1)  # (m,)
    states = hidden.float()
    sums = states.new_zeros(contextual, *states.shape[1:]).index_add_(0, assign, states[members])  # (C, ...)
    counts = torch.bincount(assign, minlength=contextual).clamp(min=1).float()  # (C,)
    merged = states[anchors] + sums / counts.view(-1, *[1] * (states.dim() - 1))
    return anchors, merged.to(hidden.dtype)


@register_method("visionzip")
@dataclass
class VisionZip:
    """Dominant tokens by attention plus contextual tokens merged by key similarity."""

    budget: Budget | None
    variant: str = "auto"  # "llm" (Qwen2.5-VL port), "vision" (CLIP recipe), "auto": llm if u > 1
    contextual_ratio: float | None = None  # C / K; None: the variant's split (see split_port, split_budget)
    version = "2"
    headline_retention = "input"

    def __post_init__(self) -> None:  # bad arguments stop the run before the model loads (exit 2)
        if self.variant not in VARIANTS:
            raise MethodError(f"visionzip: variant={self.variant!r}; use one of {', '.join(VARIANTS)}")
        if self.contextual_ratio is not None and not 0.0 <= self.contextual_ratio < 1.0:
            raise MethodError(f"visionzip: contextual_ratio={self.contextual_ratio} must lie in [0, 1)")

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        block = model.vision_feature_layer
        if block % model.vision_depth not in model.vision_full_attention:
            raise ValueError(
                f"visionzip: feature block {block % model.vision_depth} uses window attention; "
                f"full-attention blocks are {model.vision_full_attention}"
            )
        in_llm = self.variant == "llm" or (self.variant == "auto" and model.patches_per_token > 1)
        return [StageSpec(Stage.VISION, vision_layers=() if in_llm else (block,), vision_attention=(block,))]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        if inputs.budget_count is None:
            raise ValueError("visionzip needs a ratio or token budget, not a dynamic one")
        return min(inputs.budget_count, inputs.n_visual)

    def split(self, spec: StageSpec, total: int, n: int) -> tuple[int, int]:
        """(dominant, contextual) counts for ``total`` kept tokens out of ``n`` at ``spec``."""
        if self.contextual_ratio is not None:
            return split_budget(total, self.contextual_ratio)
        return split_budget(total, CLIP_CONTEXTUAL_RATIO) if spec.vision_layers else split_port(total, n)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        stats = inputs.extras["vision_attention"][spec.vision_attention[0]]
        in_llm = not spec.vision_layers
        if in_llm:  # the port: merge the merger's outputs; one key per token
            hidden = inputs.visual_embeds  # (n, d)
            keys = stats["keys"].float().mean(dim=(1, 2))  # (n, u, h, hd) -> (n, hd)
        else:  # the CLIP recipe: merge the feature layer's (u, d_v) states; the u patches' keys side by side
            hidden = inputs.vision_hidden[spec.vision_layers[0]]  # (n, u, d_v)
            keys = stats["keys"].float().mean(dim=2).flatten(1)  # (n, u, h, hd) -> (n, u * hd)
        n = inputs.n_visual
        dominant_n, contextual_n = self.split(spec, self.stage_count(spec, inputs), n)
        score = dominant_scores(stats).to(hidden.device)  # (n,)
        dominant = score.topk(dominant_n).indices
        keep, states = dominant, hidden[dominant]
        if contextual_n > 0:
            is_rest = torch.ones(n, dtype=torch.bool, device=hidden.device)
            is_rest[dominant] = False
            rest = is_rest.nonzero()[:, 0]  # ascending: raster order, as the official mask-select
            anchors, merged = contextual_merge(hidden, keys.to(hidden.device), rest, contextual_n)
            keep = torch.cat([dominant, anchors])
            states = torch.cat([states, merged])
        order = keep.argsort()
        if in_llm:
            return KeepDecision(keep[order], states=states[order], scores=score)
        return KeepDecision(keep[order], vision_states=states[order], scores=score)
