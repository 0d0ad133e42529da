"""`vispruner`: VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818), Sec. 3.

Notation: ``n`` visual tokens, ``T`` tokens kept, ``T_imp`` important, ``T_div = T - T_imp`` diverse,
``R`` tokens still in the residual pool, ``u`` vision patches per LLM token, ``d_v`` vision width.

Text-agnostic, before the LLM, at the vision tower's feature block (LLaVA-1.5: CLIP block -2;
Qwen2.5-VL: the last block), as the official ``llava/model/llava_arch.py`` ``encode_images``:
1. Important tokens: the ``T_imp = int(T * important_ratio)`` tokens with the most [CLS] attention
   (mean over heads). Towers without a CLS token (Qwen2.5-VL) rank by the attention each token receives
   at that block (mean over queries and the token's ``u`` patches), as the ModelTC/llmc Qwen2.5-VL port.
2. Diverse tokens: the rest, in descending importance, form the residual pool. Until ``R = T_div``:
   split the pool alternately into ``a`` (even places) and ``b`` (odd places); score each ``a`` token by
   its largest cosine similarity to any ``b`` token; drop the ``r = min(8, R - T_div)`` highest-scoring
   ``a`` tokens; the pool becomes the remaining ``a`` (by descending score) followed by ``b``.
3. Keep important + diverse tokens, in their original order.

Features for step 2 (``features``): ``auto`` uses the feature block's states when each LLM token is one
patch (``u = 1``, the official CLIP code), else the projected tokens (the llmc Qwen2.5-VL port compares the
merged ``inputs_embeds``); ``vision`` (mean over a token's patches) and ``embeds`` force either.

Budget (``headline_retention = "input"``): ``T = budget_count``; the official 128-token setting with
ratio 0.5 is ``--budget 128`` (64 important + 64 diverse).
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
    is_dynamic,
    register_method,
)


def importance(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) importance: [CLS] attention averaged over heads (``cls`` (h, n)), else attention received."""
    if "cls" in stats:
        return stats["cls"].float().mean(dim=0)
    return stats["received"].float()


def remove_duplicates(features: torch.Tensor, pool: torch.Tensor, target: int, step: int = 8) -> torch.Tensor:
    """Shrink ``pool`` to ``target`` tokens by VisPruner's iterative matching and pruning.

    features (Tensor, (n, c)): unit-norm features; pool (LongTensor, (R,)): candidate indices, most
    important first. Returns the surviving indices (LongTensor, (target,)), in pool order.

    Example: pool [5, 2, 7, 0], target 3: a = [5, 7], b = [2, 0]; if 7 is closer than 5 to some b token,
    7 goes; the pool becomes [5, 2, 0].
    """
    while pool.numel() > target:
        a, b = pool[0::2], pool[1::2]
        drop = min(step, pool.numel() - target, a.numel())
        similarity = (features[a] @ features[b].T).max(dim=1).values  # (|a|,) closest b per a
        order = similarity.sort(descending=True, stable=True).indices
        pool = torch.cat([a[order[drop:]], b])
    return pool


@register_method("vispruner")
@dataclass
class VisPruner:
    """Important tokens by [CLS] attention plus diverse tokens by near-duplicate removal, in the vision tower."""

    budget: Budget | None
    important_ratio: float = 0.5  # official --important_ratio default (README: vqav2.sh 128 0.5)
    features: str = "auto"  # auto | vision | embeds
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if is_dynamic(self.budget):
            raise MethodError("vispruner keeps a fixed number of tokens; pass --ratio or --budget")
        if not 0.0 <= self.important_ratio <= 1.0:
            raise MethodError(f"vispruner: important_ratio={self.important_ratio} must lie in [0, 1]")
        if self.features not in ("auto", "vision", "embeds"):
            raise MethodError(f"vispruner: features={self.features!r}; use auto, vision or embeds")
        block = model.vision_feature_layer
        if block % model.vision_depth not in model.vision_full_attention:
            raise MethodError(
                f"vispruner: feature block {block % model.vision_depth} uses window attention; "
                f"full-attention blocks are {model.vision_full_attention}"
            )
        use_vision = self.features == "vision" or (self.features == "auto" and model.patches_per_token == 1)
        return [StageSpec(Stage.VISION, vision_layers=(block,) if use_vision else (), vision_attention=(block,))]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return min(inputs.budget_count, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        block = spec.vision_attention[0]
        score = importance(inputs.extras["vision_attention"][block])  # (n,)
        total = self.stage_count(spec, inputs)
        n_important = int(total * self.important_ratio)
        order = score.sort(descending=True, stable=True).indices
        keep = order[:n_important]
        if total > n_important:
            if spec.vision_layers:
                states = inputs.vision_hidden[spec.vision_layers[0]].float().mean(dim=1)  # (n, u, d_v) -> (n, d_v)
            else:
                states = inputs.visual_embeds.float()  # (n, d)
            features = F.normalize(states.to(score.device), dim=-1)
            keep = torch.cat([keep, remove_duplicates(features, order[n_important:], total - n_important)])
        return KeepDecision(keep.sort().values.cpu(), scores=score)
