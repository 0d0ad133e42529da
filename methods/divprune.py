"""`divprune`: DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175), Sec. 3 (token pruning as MMDP).

Notation: ``n`` visual tokens, ``k`` tokens kept, ``d`` feature size, ``u`` vision patches per token.

Token pruning as a Max–Min Diversity Problem (MMDP, paper Sec. 3) over the visual tokens X: with the
cosine distance D = 1 − cos(X, X), greedily build the kept set S so that the smallest pairwise distance
inside S stays as large as possible (the paper's greedy MMDP solver), as vbdi/divprune
``LLaVA/llava/model/llava_arch.py`` (``DivPrune``) does:

* first pick: the token whose nearest other token is farthest away — argmax over j of the second-smallest
  entry of column j of D (the smallest is D[j, j] = 0);
* then k − 1 times: add argmax_j min_{s ∈ S} D[s, j] over the tokens not yet chosen (a running minimum,
  one O(n) update per step instead of the official re-reduction over all of S);
* keep the chosen tokens in their original order.

No attention, no text: the selection ignores the instruction.

Features (``features`` arg): ``embeds`` (default) — the projected visual tokens in the LLM's input space,
as the official LLaVA code (``new_input_embeds``) uses; for their Qwen2.5-VL runs of DivPrune the CDPruner
authors "perform pruning on the remaining tokens after the PatchMerger" (Theia-4869/CDPruner issue #4).
``vision`` — the vision tower's feature-layer states averaged over each token's ``u`` patches (LLaVA: CLIP
layer −2 patches; Qwen2.5-VL: the last ViT block before the merger, mean over each 2×2 unit), which is what
the Ironieser/MMTok Qwen port (``mmtok/qwen/qwen2_5_VLmodel_mmtok.py``) feeds to DivPrune.

Budget: exactly ``budget_count`` tokens. The paper's default ratio 0.098 (≈ 56 of 576 LLaVA-1.5 tokens) is
``--ratio 0.098``; the LLaVA 64/128/192-token settings are ``--budget 64|128|192``; Qwen2.5-VL ratios
(e.g. ``--ratio 0.1``, the MMTok default) keep round(ratio·n) of the merged tokens. The engine keeps
Qwen2.5-VL's M-RoPE ids of kept tokens (as the MMTok port does) and re-indexes LLaVA (as the official code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MMDP selection (paper Sec. 3). features (Tensor, (n, d)) -> sorted indices (LongTensor, (k,)).

    Runs on the features' device without a host sync per step: k steps of O(n) tensor ops after the
    (n, n) distance matrix.
    """
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - x @ x.T  # (n, n) cosine distance
    n = distance.shape[0]
    if k >= n:
        return torch.arange(n)
    nearest = distance.topk(2, dim=0, largest=False).values[1]  # (n,) second-smallest per column
    pick = nearest.argmax().view(1)  # first pick: the most isolated token
    chosen = torch.zeros(n, dtype=torch.bool, device=distance.device)
    closest = torch.full((n,), float("inf"), device=distance.device)  # min distance to the chosen set
    for step in range(k):
        chosen.index_fill_(0, pick, True)
        closest = torch.minimum(closest, distance.index_select(0, pick)[0])
        if step + 1 < k:
            pick = closest.masked_fill(chosen, float("-inf")).argmax().view(1)
    return chosen.nonzero()[:, 0].cpu()


@register_method("divprune")
@dataclass
class DivPrune(Pruner):
    """Max–min diversity pruning before the LLM. See the module docstring for rules and defaults."""

    budget: Budget | None
    features: str = "embeds"  # embeds | vision
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if is_dynamic(self.budget):
            raise MethodError("divprune keeps a fixed number of tokens; pass --ratio or --budget")
        if self.features == "embeds":
            return [StageSpec(Stage.EMBED)]
        if self.features == "vision":
            return [StageSpec(Stage.VISION, vision_layers=(model.vision_feature_layer,))]
        raise MethodError(f"divprune: features={self.features!r}; use embeds or vision")

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return min(inputs.budget_count, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        if spec.stage == Stage.VISION:
            features = inputs.vision_hidden[spec.vision_layers[0]].float().mean(dim=1)  # (n, u, d_v) -> (n, d_v)
        else:
            features = inputs.visual_embeds  # (n, d)
        return KeepDecision(max_min_diverse(features, self.stage_count(spec, inputs)))
