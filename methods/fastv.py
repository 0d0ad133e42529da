"""`fastv`: FastV (Chen et al., ECCV 2024, arXiv 2403.06764), Sec. 4 "FastV".

After layer K-1, rank image tokens by the attention the last prompt token pays them, averaged over
heads (the paper's "average attention received", taken from the last token as in the official code),
and keep the top tokens for layers K..L-1. Earlier layers keep their full KV cache, as in the official
code. Default K = 2 (the paper's setting).

Budget: like the other in-LLM methods, the budget is the layer-averaged number of visual tokens
(``headline_retention = "layer_avg"``): with n tokens, L layers and a budget of B tokens, layers
K..L-1 keep ``round((B*L - K*n) / (L - K))``. A budget below ``K/L`` of the tokens is unreachable and
refused (lower ``k``). The paper's "K=2, R=50%" setting on LLaVA-1.5 (32 layers) is
``--method-arg k=2 --ratio 0.53125`` (= (2 + 30*0.5)/32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Stage, StageInputs, StageSpec, register_method


@register_method("fastv")
@dataclass
class FastV:
    budget: Budget
    k: int = 2
    _n_layers: int = field(default=0, init=False, repr=False)
    version = "2"
    headline_retention = "layer_avg"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if not 1 <= self.k < model.n_layers:
            raise ValueError(f"fastv: k={self.k} must lie in 1..{model.n_layers - 1} for a {model.n_layers}-layer model")
        self._n_layers = model.n_layers
        return [StageSpec(Stage.LLM, layer=self.k - 1)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        n, layers = inputs.n_visual_original, self._n_layers
        after = round((inputs.budget_count * layers - self.k * n) / (layers - self.k))
        if after < 1:
            raise ValueError(
                f"fastv: a layer-averaged budget of {inputs.budget_count}/{n} tokens is unreachable with k={self.k} "
                f"of {layers} layers (the first k layers alone average {self.k * n / layers:.0f}); lower --method-arg k"
            )
        return min(after, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        score = inputs.text_attention.mean(dim=0)  # (n,)
        top = score.topk(self.stage_count(spec, inputs)).indices
        return KeepDecision(top.sort().values, scores=score)
