"""`fastv`: FastV (Chen et al., ECCV 2024, arXiv 2403.06764), Sec. 4 "FastV".

After layer K-1, rank image tokens by the attention the last prompt token pays them, averaged over
heads (the paper's "average attention received", taken from the last token as in the official code),
and keep the top ``budget`` for layers K..L-1. Defaults K = 2 (the paper's K=2, R=50% setting
corresponds to ``--ratio 0.5``). Earlier layers keep their full KV cache, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Stage, StageInputs, StageSpec, register_method


@register_method("fastv")
@dataclass
class FastV:
    budget: Budget
    k: int = 2
    version = "1"
    headline_retention = "layer_avg"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if not 1 <= self.k < model.n_layers:
            raise ValueError(f"fastv: k={self.k} must lie in 1..{model.n_layers - 1} for a {model.n_layers}-layer model")
        return [StageSpec(Stage.LLM, layer=self.k - 1)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return inputs.budget_count

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        score = inputs.text_attention.mean(dim=0)  # (n,)
        top = score.topk(inputs.budget_count).indices
        return KeepDecision(top.sort().values, scores=score)
