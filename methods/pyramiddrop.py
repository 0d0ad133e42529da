"""`pyramiddrop`: PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247), Sec. 3.2-3.3.

Notation: ``L`` LLM layers, ``N`` visual tokens of the image, ``S`` drop boundaries, ``lam`` the
per-stage keep ratio (the paper's lambda), ``r`` the layer-averaged retention the budget asks for.

Rule (Sec. 3.2 "rank & drop", official ``pdrop_rank_drop`` in ``llava/model/modeling_llama_pdrop.py``):
the forward pass is split into stages at boundaries ``b_1 < ... < b_S`` (counted in layers: a drop
*after* ``b`` layers). At boundary ``b`` the hidden states leaving layer ``b - 1`` (0-based) go through
layer ``b``'s input norm and q/k projections with RoPE at the current positions; the last instruction
token's softmax attention over all keys is averaged over heads, the image slice is ranked and the top
``floor(N lam^s)`` tokens are kept in their original order (``s`` = 1..S; official
``int(image_tokens * ratio)`` of the *original* count). Here: ``StageSpec(llm, layer=b - 1,
attention_from="next")``. Earlier layers keep their longer KV cache; positions follow the engine's
family policy (LLaVA: re-indexed contiguously, as the official code does).

Layouts and budgets (``headline_retention = "layer_avg"``: the average over layers of visual tokens):
- ``lam`` set (``--method-arg lam=0.5``, no budget): the paper's main setting, ``S = 3`` boundaries at
  ``L/4, L/2, 3L/4`` (official ``--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]`` for
  32 layers; 4 equal stages, layer average ``N (1 + lam + lam^2 + lam^3) / 4`` = 0.469 N at lam = 0.5).
- a budget (``--ratio r`` or ``--budget k``, ``r = k / N``): ``lam`` is solved so that the layer
  average ``sum_s w_s lam^s`` equals ``r`` (``w_s`` = the fraction of layers in stage ``s``; bisection,
  the average is increasing in ``lam``). Four equal stages cannot go below ``r = 1/4`` (the first stage
  keeps every token; the official issue #10 notes this), so the 192/128/64-token comparisons add an
  earlier first drop after ``early_layer = 2`` layers: boundaries ``2, L/4, L/2, 3L/4`` with
  ``avg = (2 + 6 lam + 8 lam^2 + 8 lam^3 + 8 lam^4) / 32`` for LLaVA-1.5-7B: 192 -> lam 0.581,
  128 -> 0.437, 64 -> 0.196 (13B, 40 layers: 0.586 / 0.448 / 0.225). These values reproduce the
  lambda table of a public third-party PDrop port; the official repository publishes no configuration
  for these settings. ``early_layer=0`` uses the four equal stages instead (needs ``r > 1/4``);
  ``layer_list="8,16,24"`` sets the boundaries explicitly (official 1-based convention).
Layers scale with depth (boundaries ``round(L k / 4)``); on a 4-layer model the stages are one layer
each and the early boundary is skipped. Qwen2.5-VL has no official port: the same rule runs with the
model's M-RoPE at the kept tokens' original positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def stage_weights(boundaries: tuple[int, ...], n_layers: int) -> list[float]:
    """Fraction of the layers in each stage: ``stage_weights((8, 16, 24), 32) == [0.25] * 4``."""
    edges = (0, *boundaries, n_layers)
    return [(edges[s + 1] - edges[s]) / n_layers for s in range(len(edges) - 1)]


def layer_average(lam: float, weights: list[float]) -> float:
    """Layer-averaged retention ``sum_s w_s lam^s`` (ignoring the floor on counts)."""
    return sum(w * lam**s for s, w in enumerate(weights))


def solve_lambda(ratio: float, weights: list[float]) -> float:
    """The ``lam`` in [0, 1] whose layer average is ``ratio`` (bisection; monotone in ``lam``)."""
    if ratio >= 1.0:
        return 1.0
    if ratio <= weights[0]:
        raise ValueError(
            f"pyramiddrop: a layer-averaged retention of {ratio:.4f} is unreachable: the first stage alone "
            f"(before any drop) is {weights[0]:.4f} of the layers; lower early_layer or pass layer_list"
        )
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if layer_average(mid, weights) < ratio else (low, mid)
    return (low + high) / 2


def stage_count(n_visual: int, lam: float, stage: int) -> int:
    """Tokens kept after boundary ``stage`` (1-based): ``max(1, floor(N lam^s))``, the official ``int()``."""
    return max(1, min(n_visual, math.floor(n_visual * lam**stage + 1e-9)))


def first_drop_hint(ratio: float, n_layers: int, bounds: tuple[int, ...], quarter: int, listed: bool) -> str:
    """A setting whose first stage lies below layer-averaged retention ``ratio``.

    The latest first drop ``b`` with ``b / L < ratio``: as ``early_layer`` when it comes before the
    ``L/4`` boundary and no ``layer_list`` was ``listed``, else as the first of ``layer_list``. When not
    even a drop after layer 1 reaches ``ratio``, that drop with the smallest round ratio above ``1/L``.
    """
    latest = max((b for b in range(1, n_layers) if b / n_layers < ratio), default=None)
    suffix = ""
    if latest is None:
        above = math.ceil((1 / n_layers + 0.05) * 100) / 100
        latest, suffix = 1, f" --ratio {above:g}"
    if latest < quarter and not listed:
        return f"pass --method-arg early_layer={latest}{suffix}"
    if bounds[0] <= latest:  # the layout already drops early enough: only the ratio is out of reach
        return f"on {n_layers} layers PyramidDrop reaches only retention > {1 / n_layers:.4g}: pass{suffix}"
    layers = ",".join(map(str, sorted({latest, *(b for b in bounds if b > latest)})))
    return f"pass --method-arg layer_list={layers}{suffix}"


@register_method("pyramiddrop")
@dataclass
class PyramidDrop(Pruner):
    """Multi-stage rank & drop by the last instruction token's attention, keeping lam^s per stage."""

    budget: Budget | None
    lam: float = 0.0  # > 0: the paper's fixed-lambda setting (0.5) at L/4, L/2, 3L/4; 0: solve from the budget
    early_layer: int = 2  # budget mode: an extra first drop after this many layers (0: none)
    layer_list: str = ""  # explicit boundaries, 1-based as the official --layer_list, e.g. "8,16,24"
    version = "1"
    headline_retention = "layer_avg"

    def boundaries(self, n_layers: int) -> tuple[int, ...]:
        """Drop boundaries (layers run before each drop) for an ``n_layers`` LLM."""
        if self.layer_list:
            try:
                bounds = tuple(sorted({int(x) for x in self.layer_list.replace("[", "").replace("]", "").split(",")}))
            except ValueError:
                raise MethodError(
                    f"pyramiddrop: layer_list={self.layer_list!r}: use comma-separated layer counts, e.g. layer_list=8,16,24"
                ) from None
        else:
            bounds = self.quarters(n_layers)
            if self.lam <= 0 and 0 < self.early_layer < bounds[0]:
                bounds = (self.early_layer, *bounds)
        if not bounds or bounds[0] < 1 or bounds[-1] > n_layers - 1:
            raise MethodError(
                f"pyramiddrop: boundaries {bounds} must lie in 1..{n_layers - 1} for {n_layers} layers; "
                f"pass e.g. --method-arg layer_list={','.join(map(str, self.quarters(n_layers)))}"
            )
        return bounds

    @staticmethod
    def quarters(n_layers: int) -> tuple[int, ...]:
        """The paper's boundaries ``L/4, L/2, 3L/4`` (distinct, at least 1)."""
        return tuple(sorted({max(1, round(n_layers * k / 4)) for k in (1, 2, 3)}))

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if is_dynamic(self.budget):
            raise BudgetError("pyramiddrop has no dynamic budget; pass --ratio, --budget or --method-arg lam=0.5")
        if self.lam > 0 and self.budget is not None:
            raise MethodError("pyramiddrop: pass either a budget (--ratio/--budget) or lam, not both")
        if not 0 <= self.lam <= 1:
            raise MethodError(f"pyramiddrop: lam={self.lam} must lie in (0, 1]; pass e.g. --method-arg lam=0.5")
        if self.early_layer < 0:
            raise MethodError(f"pyramiddrop: early_layer={self.early_layer} must be >= 0 (0: no early drop)")
        bounds = self.boundaries(model.n_layers)
        # The layout depends on the depth, which `StageInputs` does not carry: remember it for stage_count.
        self._stage_of = {b - 1: s for s, b in enumerate(bounds, start=1)}
        self._weights = stage_weights(bounds, model.n_layers)
        self._n_layers, self._bounds = model.n_layers, bounds
        if self.lam <= 0 and fixed_ratio(self.budget) is not None:
            self.check_reachable(fixed_ratio(self.budget))
        return [StageSpec(Stage.LLM, layer=b - 1, attention_from="next") for b in bounds]

    def check_reachable(self, ratio: float) -> None:
        """Refuse a layer-averaged ``ratio`` at or below the first stage's share (which keeps every token)."""
        if ratio < 1 and ratio <= self._weights[0]:
            raise BudgetError(
                f"pyramiddrop: layer-averaged retention {ratio:.4g} is unreachable: the first stage (before any drop) "
                f"is {self._weights[0]:.4g} of the {self._n_layers} layers; "
                + first_drop_hint(ratio, self._n_layers, self._bounds, self.quarters(self._n_layers)[0], bool(self.layer_list))
            )

    def lam_for(self, inputs: StageInputs) -> float:
        """This sample's lambda: ``lam`` if set, else solved for the budget's layer average."""
        if self.lam > 0:
            return self.lam
        ratio = fixed_ratio(self.budget) or inputs.budget_count / inputs.n_visual_original
        self.check_reachable(ratio)
        return solve_lambda(ratio, self._weights)

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        count = stage_count(inputs.n_visual_original, self.lam_for(inputs), self._stage_of[spec.layer])
        return min(count, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        score = inputs.text_attention.float().mean(dim=0)  # (n,) softmax over all keys, mean over heads
        top = score.topk(self.stage_count(spec, inputs)).indices
        return KeepDecision(top.sort().values, scores=score)
