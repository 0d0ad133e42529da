"""`divprune`: DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175), Sec. 3 "Diversity-based pruning".

Token pruning as a Max–Min Diversity Problem (MMDP, Eq. 4) over the projected visual tokens X (the LLM's
input space): with D = 1 − cos(X, X) (Eq. 5), greedily build the kept set S so that the minimum
pairwise distance inside S stays as large as possible (Algorithm 1):

* first pick: the token whose nearest other token is farthest away (argmax over j of the second-smallest
  entry of column j of D, the smallest being D[j, j] = 0), as the official code does;
* then, k − 1 times: add argmax_j min_{s ∈ S} D[s, j] over the tokens not yet chosen;
* keep the chosen tokens in their original order.

No attention and no text: the selection is instruction-agnostic. Budget: exactly ``budget_count`` tokens
(the paper's default ratio 0.098 ≈ 56 of 576 tokens on LLaVA-1.5; 64/128/192 tokens via ``--budget``).
Qwen2.5-VL: the same rule on the merged visual tokens; the engine keeps their M-RoPE ids (as the
MMTok port does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Stage, StageInputs, StageSpec, register_method


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MMDP selection. features (Tensor, (n, d)) -> sorted indices (LongTensor, (k,))."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - x @ x.T  # (n, n), Eq. 5
    n = distance.shape[0]
    if k >= n:
        return torch.arange(n)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    nearest = distance.topk(2, dim=0, largest=False).values[1]  # second-smallest per column
    first = int(nearest.argmax())
    chosen = torch.zeros(n, dtype=torch.bool, device=distance.device)
    chosen[first] = True
    closest = distance[first].clone()  # min distance of every token to the chosen set
    for _ in range(k - 1):
        pick = int(closest.masked_fill(chosen, -1.0).argmax())
        chosen[pick] = True
        closest = torch.minimum(closest, distance[pick])
    return chosen.nonzero()[:, 0].cpu()


@register_method("divprune")
@dataclass
class DivPrune:
    budget: Budget
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        return [StageSpec(Stage.EMBED)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return min(inputs.budget_count, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        return KeepDecision(max_min_diverse(inputs.visual_embeds, self.stage_count(spec, inputs)))
