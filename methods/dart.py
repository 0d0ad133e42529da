"""`dart`: DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", arXiv 2502.11494, EMNLP 2025), Sec. 3 "Duplication-Aware Reduction of Tokens".

Notation: ``n`` visual tokens, ``m`` prompt tokens after the image, ``d`` LLM hidden size, ``L`` LLM
layers, ``K`` the pruning layer, ``P = P_img + P_txt`` pivots, ``T`` visual tokens kept from layer K on.

Before LLM layer K (after layer K-1; official ``pruned_layer 2``), with no attention scores:
1. Pivots: the ``P_img`` visual tokens and the ``P_txt`` prompt tokens after the image with the largest
   L1 norm of their layer K-1 keys (post-RoPE, all heads concatenated; official 4 + 4).
2. Each pivot in turn claims its quota of the not-yet-claimed, non-pivot visual tokens that are *least*
   cosine-similar to it, on the hidden states leaving layer K-1 passed through the model's final norm.
   (Cosine ignores each token's RMS scale, so the final RMSNorm acts as its weight vector alone.)
3. Kept: the image pivots and every claimed visual token; the text pivots themselves are text.

Budget (``headline_retention = "layer_avg"``, as FastV): a layer-averaged budget of B tokens keeps
``T = round((B L - K n) / (L - K))`` from layer K on. The official quota is ``T_off // P`` per pivot
(``max_num_trunction`` 128 keeps 4 + 8 x 16 = 132); here the ``T - P_img`` non-pivot tokens are split as
evenly as possible (the first ``(T - P_img) % P`` pivots claim one more) so ``T`` is met exactly.

Engine inputs: the stage asks for ``prompt_context``, so the engine sets ``extras["visual_keys"]``
(n, h_kv, hd), ``extras["text_keys"]`` (m, h_kv, hd) (layer K-1's keys with RoPE, as the official code
reads them from that layer's cache), ``extras["text_hidden_states"]`` (m, d) and
``extras["final_norm_weight"]`` (d,), and the rule above runs as published. Inputs built without them
(unit tests, third-party engines) get image pivots by the L1 norm of the hidden states, no text pivots
(``P = P_img``) and no final-norm weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokbench.pruner import (
    Budget,
    BudgetError,
    KeepDecision,
    MethodError,
    ModelInfo,
    Stage,
    StageInputs,
    StageSpec,
    fixed_ratio,
    is_dynamic,
    register_method,
)


def kept_after(budget_count: int, n: int, n_layers: int, k: int) -> int:
    """Tokens kept from layer ``k`` on so the layer average is ``budget_count``: round((B L - k n) / (L - k))."""
    after = round((budget_count * n_layers - k * n) / (n_layers - k))
    if after < 1:
        raise MethodError(
            f"dart: a layer-averaged budget of {budget_count}/{n} tokens is unreachable with k={k} of {n_layers} "
            f"layers (the first k layers alone average {k * n / n_layers:.0f}); lower --method-arg k"
        )
    return min(after, n)


def quotas(remaining: int, pivots: int) -> list[int]:
    """Split ``remaining`` tokens over ``pivots`` as evenly as possible: ``quotas(10, 4) == [3, 3, 2, 2]``."""
    base, extra = divmod(remaining, pivots)
    return [base + (p < extra) for p in range(pivots)]


def duplication_select(
    visual: torch.Tensor, visual_score: torch.Tensor, text: torch.Tensor, text_score: torch.Tensor,
    total: int, pivot_image: int, pivot_text: int,
) -> torch.Tensor:
    """DART's selection for one sample. Returns the kept visual indices (LongTensor, (total,)), sorted.

    visual (Tensor, (n, d)), text (Tensor, (m, d)): states compared by cosine; visual_score (n,),
    text_score (m,): pivot scores (larger = pivot). Image pivots come first (by score), then text pivots;
    each claims the unclaimed non-pivot tokens least similar to it.

    Example: n = 6, total = 4, one image pivot (token 2) and one text pivot: the 3 other tokens are split
    [2, 1]; token 2 claims the two tokens least similar to it, the text pivot the next least similar.
    """
    n = visual.shape[0]
    image_pivots = visual_score.topk(min(pivot_image, total, n)).indices
    text_pivots = text_score.topk(min(pivot_text, text.shape[0])).indices
    pivot_states = torch.cat([visual[image_pivots], text[text_pivots]]).float()  # (P, d)
    free = torch.ones(n, dtype=torch.bool, device=visual.device)
    free[image_pivots] = False
    keep = [image_pivots]
    states = F.normalize(visual.float(), dim=-1)
    for pivot, quota in zip(F.normalize(pivot_states, dim=-1), quotas(total - image_pivots.numel(), len(pivot_states))):
        if quota == 0:
            continue
        similarity = (states @ pivot).masked_fill(~free, float("inf"))  # (n,) claimed tokens never win
        claimed = similarity.topk(quota, largest=False).indices
        free[claimed] = False
        keep.append(claimed)
    return torch.cat(keep).sort().values


@register_method("dart")
@dataclass
class DART:
    """Pivots by key norm, then the tokens least duplicating them, before LLM layer ``k``."""

    budget: Budget | None
    k: int = 2  # official pruned_layer: prune after layers 0..k-1
    pivot_image: int = 4
    pivot_text: int = 4
    _n_layers: int = field(default=0, init=False, repr=False)
    version = "1"
    headline_retention = "layer_avg"
    position_policy = "keep"  # official LLaVA and Qwen2.5-VL code keep the kept tokens' position ids

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if is_dynamic(self.budget):
            raise MethodError("dart keeps a fixed number of tokens; pass --ratio or --budget")
        if not 1 <= self.k < model.n_layers:
            raise MethodError(f"dart: k={self.k} must lie in 1..{model.n_layers - 1} for a {model.n_layers}-layer model")
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise MethodError(f"dart: pivot_image={self.pivot_image} must be >= 1 and pivot_text={self.pivot_text} >= 0")
        ratio = fixed_ratio(self.budget)
        if ratio is not None and ratio <= self.k / model.n_layers:
            reach = [k for k in range(1, model.n_layers) if ratio > k / model.n_layers]
            hint = f"pass --method-arg k={max(reach)}" if reach else "pass a larger --ratio"
            raise BudgetError(
                f"dart: layer-averaged retention {ratio:g} is unreachable with k={self.k} of {model.n_layers} layers "
                f"(the first k layers keep every token: > {self.k / model.n_layers:.4g}); {hint}"
            )
        self._n_layers = model.n_layers
        return [StageSpec(Stage.LLM, layer=self.k - 1, attention_from="none", prompt_context=True)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return min(kept_after(inputs.budget_count, inputs.n_visual_original, self._n_layers, self.k), inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        extras = inputs.extras
        visual = inputs.hidden_states  # (n, d) leaving layer k-1
        weight = extras.get("final_norm_weight")
        scale = torch.ones_like(visual[0]) if weight is None else weight.to(visual)
        if "visual_keys" in extras:
            visual_score = extras["visual_keys"].float().abs().flatten(1).sum(-1)  # (n,) key L1 norm
            text = extras["text_hidden_states"] * scale
            text_score = extras["text_keys"].float().abs().flatten(1).sum(-1)  # (m,)
            pivot_text = self.pivot_text
        else:  # inputs without the prompt context (docs/methods/dart.md)
            visual_score = visual.float().abs().sum(-1)
            text, text_score, pivot_text = visual[:0], visual.new_zeros(0), 0
        total = self.stage_count(spec, inputs)
        keep = duplication_select(visual * scale, visual_score, text, text_score, total, self.pivot_image, pivot_text)
        return KeepDecision(keep.cpu(), scores=visual_score)
