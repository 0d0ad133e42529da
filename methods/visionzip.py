"""`visionzip`: VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467), Sec. 4.1-4.2.

Notation: ``n`` visual tokens of the sample, ``u`` vision patches per LLM token (1 CLIP, 4 Qwen2.5-VL),
``d_v`` vision hidden size, ``h`` vision heads, ``hd`` head dim, ``K`` budget, ``D`` dominant, ``C``
contextual tokens (``K = D + C``).

Acts once, in the vision tower, at the block whose output feeds the projector (the feature layer:
LLaVA-1.5 CLIP block -2, Qwen2.5-VL the last block). Text-agnostic.

1. Dominant tokens (Sec. 4.1): the ``D`` tokens with the largest attention score, kept unchanged.
   CLIP: the CLS query's attention to each patch, summed over heads (official
   ``visionzip/clip_encoder.py``, ``cls_attention.sum(dim=1)`` at ``attentions[-2]``).
2. Contextual tokens (Sec. 4.2): the remaining ``n - D`` tokens, in raster order, get ``C`` anchors
   at a uniform stride ``max(1, (n - D) // C)`` (the first ``C`` of ``0, step, 2 step, ...``); every
   other remaining token joins the anchor whose head-averaged key at the same block is most similar
   (cosine); each anchor becomes ``anchor + mean(members)`` (anchor unchanged when it has none).
   Merged in the feature layer's space (`KeepDecision.vision_states`), then projected, as the official
   code merges CLIP layer -2 states before the projector.

Budget: ``K = budget_count`` split as ``C = round(K * contextual_ratio)``, ``D = K - C`` with
``contextual_ratio = 10/64``. This reproduces the official LLaVA-1.5 settings 64 = 54 + 10 (README),
128 = 108 + 20, 192 = 162 + 30, and LLaVA-NeXT's 160 = 135 + 25 per crop (maintainer, issue #17);
``--ratio r`` gives ``K = round(r n)`` split the same way.

Per-family adaptation (see docs/methods/visionzip.md):
- LLaVA: the official code sends CLS as one of the ``D`` dominant tokens (top ``D - 1`` patches +
  CLS); llava-hf drops CLS, so here all ``D`` dominant tokens are patches.
- Qwen2.5-VL has no CLS and the official repo has no Qwen port: the score is the attention each token
  receives at the last block (sum over heads, mean over queries, mean over the token's 4 patches),
  as VScan's Qwen port scores tokens; similarity uses the 4 patches' head-averaged keys concatenated
  (these keys carry the tower's 2-D RoPE); merging acts on the (4, d_v) merger inputs.
- Kept tokens stay at their raster positions (the official code appends contextual tokens after the
  dominant ones; the engine keeps a token where it was, contextual tokens at their anchor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Stage, StageInputs, StageSpec, register_method


def split_budget(total: int, contextual_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) for ``total`` kept tokens: ``64 -> (54, 10)``, ``192 -> (162, 30)``."""
    contextual = min(total - 1, round(total * contextual_ratio)) if total > 1 else 0
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

    hidden (Tensor, (n, u, d_v)): feature-layer states; keys (Tensor, (n, f)): similarity features;
    rest (LongTensor, (r,)): non-dominant token indices in ascending order.
    Returns anchor indices (LongTensor, (contextual,)) and their merged states (contextual, u, d_v).

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
    sums = states.new_zeros(contextual, *states.shape[1:]).index_add_(0, assign, states[members])  # (C, u, d_v)
    counts = torch.bincount(assign, minlength=contextual).clamp(min=1).float()  # (C,)
    merged = states[anchors] + sums / counts[:, None, None]
    return anchors, merged.to(hidden.dtype)


@register_method("visionzip")
@dataclass
class VisionZip:
    """Dominant tokens by attention plus contextual tokens merged by key similarity, in the vision tower."""

    budget: Budget
    contextual_ratio: float = 10 / 64  # C / K: 54 + 10 of 64 (official README), 162 + 30 of 192
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if not 0.0 <= self.contextual_ratio < 1.0:
            raise ValueError(f"visionzip: contextual_ratio={self.contextual_ratio} must lie in [0, 1)")
        block = model.vision_feature_layer
        if model.family == "qwen2_5_vl" and block % model.vision_depth not in model.vision_full_attention:
            raise ValueError(
                f"visionzip: feature block {block % model.vision_depth} uses window attention; "
                f"full-attention blocks are {model.vision_full_attention}"
            )
        return [StageSpec(Stage.VISION, vision_layers=(block,), vision_attention=(block,))]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        if inputs.budget_count is None:
            raise ValueError("visionzip needs a ratio or token budget, not a dynamic one")
        return min(inputs.budget_count, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        block = spec.vision_attention[0]
        stats = inputs.extras["vision_attention"][block]
        hidden = inputs.vision_hidden[spec.vision_layers[0]]  # (n, u, d_v)
        n = inputs.n_visual
        dominant_n, contextual_n = split_budget(self.stage_count(spec, inputs), self.contextual_ratio)
        score = dominant_scores(stats).to(hidden.device)  # (n,)
        dominant = score.topk(dominant_n).indices
        keep, states = dominant, hidden[dominant]
        if contextual_n > 0:
            is_rest = torch.ones(n, dtype=torch.bool, device=hidden.device)
            is_rest[dominant] = False
            rest = is_rest.nonzero()[:, 0]  # ascending: raster order, as the official mask-select
            keys = stats["keys"].float().mean(dim=2).flatten(1).to(hidden.device)  # (n, u, h, hd) -> (n, u*hd)
            anchors, merged = contextual_merge(hidden, keys, rest, contextual_n)
            keep = torch.cat([dominant, anchors])
            states = torch.cat([states, merged])
        order = keep.argsort()
        return KeepDecision(keep[order], vision_states=states[order], scores=score)
