"""`fastv`: FastV (Chen et al., ECCV 2024, arXiv 2403.06764), Sec. 4 "FastV".

After layer K-1, rank image tokens by the attention the last prompt token pays them, averaged over
heads (the paper's "average attention received", taken from the last token as in the official code),
and keep the top tokens for layers K..L-1. Earlier layers keep their full KV cache, as in the official
code. Default K = 2 (the paper's setting).

Budget: like the other in-LLM methods, the budget is the layer-averaged number of visual tokens
(``headline_retention = "layer_avg"``): with n tokens, L layers and a budget of B tokens, layers
K..L-1 keep ``round((B*L - K*n) / (L - K))``. The first K layers keep every token, so a retention of
``K/L`` or less is unreachable: it is refused before the model loads, with a K (or, on shallow models,
a ratio) that reaches it. The paper's "K=2, R=50%" setting on LLaVA-1.5 (32 layers) is
``--method-arg k=2 --ratio 0.53125`` (= (2 + 30*0.5)/32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokbench.pruner import (
    Budget,
    BudgetError,
    KeepDecision,
    MethodError,
    ModelInfo,
    Pruner,
    Stage,
    StageInputs,
    StageSpec,
    fixed_ratio,
    is_dynamic,
    register_method,
)


def kept_after(budget: int, n: int, k: int, n_layers: int) -> int:
    """Tokens layers k..L-1 keep so that the layer average is ``budget`` of ``n``: ``kept_after(32, 64, 2, 4) == 0``."""
    return round((budget * n_layers - k * n) / (n_layers - k))


def largest_k(ratio: float, n_layers: int) -> int | None:
    """The largest K in 1..L-1 whose floor ``K/L`` lies below ``ratio`` (None: not even K = 1)."""
    return max((k for k in range(1, n_layers) if k / n_layers < ratio), default=None)


def reach_hint(ratio: float, n_layers: int) -> str:
    """A setting that works: the largest K that reaches layer-averaged retention ``ratio`` on ``n_layers``,
    or, below ``1/L``, K = 1 with the smallest round ratio above its floor."""
    k = largest_k(ratio, n_layers)
    if k is not None:
        return f"k={k} reaches it (retention > {k / n_layers:.4g}): pass --method-arg k={k}"
    above = math.ceil((1 / n_layers + 0.05) * 100) / 100
    return (
        f"on {n_layers} layers FastV reaches only retention > {1 / n_layers:.4g} (k=1): "
        f"pass --method-arg k=1 --ratio {above:g}"
    )


@register_method("fastv")
@dataclass
class FastV(Pruner):
    budget: Budget | None
    k: int = 2
    _n_layers: int = field(default=0, init=False, repr=False)
    version = "2"
    headline_retention = "layer_avg"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        layers = model.n_layers
        ratio = fixed_ratio(self.budget)
        if not 1 <= self.k < layers:
            hint = reach_hint(ratio, layers) if ratio is not None and ratio < 1 else f"pass --method-arg k={min(2, layers - 1)}"
            raise MethodError(f"fastv: k={self.k} must lie in 1..{layers - 1} for a {layers}-layer model; {hint}")
        if ratio is not None and ratio <= self.k / layers:
            raise BudgetError(
                f"fastv: layer-averaged retention {ratio:g} is unreachable with k={self.k} of {layers} layers "
                f"(the first k layers keep every token: > {self.k / layers:.4g}); {reach_hint(ratio, layers)}"
            )
        if is_dynamic(self.budget):
            raise BudgetError("fastv keeps a fixed number of tokens; pass --ratio or --budget")
        self._n_layers = layers
        return [StageSpec(Stage.LLM, layer=self.k - 1)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        n, layers, budget = inputs.n_visual_original, self._n_layers, inputs.budget_count
        after = kept_after(budget, n, self.k, layers)
        if after < 1:
            working = [k for k in range(1, layers) if kept_after(budget, n, k, layers) >= 1]
            least = math.floor((n + 0.5 * (layers - 1)) / layers) + 1  # smallest budget k = 1 reaches (round > 0.5)
            hint = f"pass --method-arg k={max(working)}" if working else f"pass --method-arg k=1 --budget {least}"
            raise BudgetError(
                f"fastv: a layer-averaged budget of {budget}/{n} tokens is unreachable with k={self.k} of {layers} "
                f"layers (the first k layers alone average {self.k * n / layers:.0f}); {hint}"
            )
        return min(after, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        score = inputs.text_attention.mean(dim=0)  # (n,)
        top = score.topk(self.stage_count(spec, inputs)).indices
        return KeepDecision(top.sort().values, scores=score)
