"""`sparsevlm`: SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", ICML 2025, arXiv 2410.04417), Sec. 3; behaviour of the official
v1.5 code (Gumpest/SparseVLMs, branch ``v1.5``).

Notation: ``n`` visual tokens of the image, ``n_s`` before sparse stage ``s``, ``m`` prompt tokens after
the image, ``h`` heads, ``L`` LLM layers, ``S_s`` tokens selected at stage ``s``, ``C_s`` recycled tokens.

1. Raters: the prompt tokens after the image whose relevance to the image is above average, on the input
   embeddings: ``softmax(V P^T, over prompt tokens).mean(over visual tokens) > its mean``.
2. At the sparse layers (official 0-based 2, 6, 15 of 32; ``round(l L / 32)`` on other depths) the layer's
   own attention from the raters to the visual tokens, averaged over heads and raters, ranks the visual
   tokens; the top ``S_s`` survive for the later layers.
3. Recycling: of the pruned tokens, the top ``int(0.3 p) + 1`` by the same relevance are clustered into
   ``C_s = int(that / 10) + 1`` tokens (density-peak k-NN clustering, DPC-kNN) and each cluster's mean state
   is kept; here it takes the place of the cluster's centre token.

Budget (``headline_retention = "layer_avg"``): a layer-averaged budget ``B`` sets the totals kept after
each sparse layer (``T_s = S_s + C_s``): ``T_1 = round(n lam)``, ``T_2 = round(n lam^2)`` with ``lam``
solved so that the layer average of ``n, n lam, n lam^2, n lam^3`` is ``B``, and ``T_3`` taking up the
rounding so that the average is ``B``. ``counts="300,200,110"`` sets the official selected counts
``S_s`` instead (score.py: 192 -> 300,200,110; 128 -> 303,110,36; 64 -> 66,30,17), recycled tokens on top.

Engine inputs: the stages ask for ``prompt_context``, so the engine hands the raters' attention rows
``extras["prompt_attention"]`` (m, h, n), ``extras["prompt_embeds"]`` (m, d) and
``extras["visual_input_embeds"]`` (n0, d) of the visual tokens entering layer 0. Inputs built without
them (unit tests) fall back to the last prompt token as the only rater (`StageInputs.text_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

OFFICIAL_LAYERS = (2, 6, 15)  # of 32 (LLaVA-1.5-7B); pruning after these 0-based layers


def recycled(pruned: int) -> int:
    """Tokens recycled from ``pruned`` pruned tokens: ``int((int(0.3 p) + 1) / 10) + 1`` (0 when none)."""
    return 0 if pruned <= 0 else (int(0.3 * pruned) + 1) // 10 + 1


def split_total(total: int, n_current: int) -> int:
    """Selected tokens ``S`` so that ``S + recycled(n_current - S) == total`` (largest such S; else total)."""
    for selected in range(total - 1, 0, -1):
        if selected + recycled(n_current - selected) == total:
            return selected
    return total


def relevance(inputs: StageInputs) -> torch.Tensor:
    """(n,) attention from the raters to each visual token, mean over heads and raters."""
    extras = inputs.extras
    if "prompt_attention" not in extras:
        return inputs.text_attention.float().mean(dim=0)  # the last prompt token as the only rater
    visual, prompt = extras["visual_input_embeds"].float(), extras["prompt_embeds"].float()
    affinity = (visual @ prompt.T).softmax(dim=1).mean(dim=0)  # (m,)
    raters = affinity > affinity.mean()
    return extras["prompt_attention"][raters].float().mean(dim=(0, 1))


def density_peak_merge(states: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN: cluster ``states`` (N, d) into ``clusters`` groups; returns centre rows and mean states.

    noise (Tensor, (N,)): tie-breaking added to the densities (the official code uses 1e-6 * rand).
    Returns centres (LongTensor, (clusters,)) into ``states`` and merged (Tensor, (clusters, d)).
    """
    x = states.float()
    distance = torch.cdist(x, x) / x.shape[1] ** 0.5  # (N, N)
    nearest = distance.topk(clusters, dim=1, largest=False).values  # (N, k), self included
    density = (-(nearest**2).mean(dim=1)).exp() + noise.to(x.device)
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = torch.where(denser, distance, distance.max()).min(dim=1).values  # (N,)
    centres = (parent * density).topk(clusters).indices
    assign = distance[centres].argmin(dim=0)  # (N,) nearest centre
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = x.new_zeros(clusters, x.shape[1]).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=clusters).float()
    return centres, sums / counts[:, None]


@register_method("sparsevlm")
@dataclass
class SparseVLM:
    """Text-rated visual sparsification at three LLM layers with token recycling (official v1.5)."""

    budget: Budget | None
    counts: str = ""  # official selected counts per sparse layer, e.g. "300,200,110"; empty: from the budget
    version = "1"
    headline_retention = "layer_avg"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if is_dynamic(self.budget):
            raise MethodError("sparsevlm keeps a fixed schedule; pass --ratio, --budget or --method-arg counts=...")
        if self.counts and self.budget is not None:
            raise MethodError("sparsevlm: pass either a budget (--ratio/--budget) or counts, not both")
        layers = sorted({min(round(l * model.n_layers / 32), model.n_layers - 2) for l in OFFICIAL_LAYERS})
        if self.counts and len(self._counts()) != len(layers):
            raise MethodError(f"sparsevlm: counts={self.counts!r} needs {len(layers)} values, one per sparse layer")
        ratio = fixed_ratio(self.budget)
        floor = (layers[0] + 1) / model.n_layers  # layers 0..first sparse layer keep every token
        if ratio is not None and ratio <= floor:
            raise BudgetError(
                f"sparsevlm: layer-averaged retention {ratio:g} is unreachable on {model.n_layers} layers: layers "
                f"0..{layers[0]} keep every token (> {floor:.4g}); pass a larger --ratio"
            )
        self._layers = layers
        self._n_layers = model.n_layers
        return [StageSpec(Stage.LLM, layer=layer, attention_from="none", prompt_context=True) for layer in layers]

    def _counts(self) -> list[int]:
        try:
            values = [int(x) for x in self.counts.split(",")]
        except ValueError:
            raise MethodError(f"sparsevlm: counts={self.counts!r} must be whole numbers, e.g. 300,200,110") from None
        if any(v < 1 for v in values):
            raise MethodError(f"sparsevlm: counts={self.counts!r} must be >= 1")
        return values

    def plan(self, n: int, budget_count: int) -> list[tuple[int, int]]:
        """(selected, total kept) after each sparse layer for an image of ``n`` tokens."""
        out, current = [], n
        if self.counts:
            for selected in self._counts():
                selected = min(selected, current - 1) if current > 1 else current
                current = selected + recycled(current - selected)
                out.append((selected, current))
            return out
        for total in layer_schedule(n, budget_count, self._layers, self._n_layers):
            total = min(total, current)
            out.append((split_total(total, current) if total < current else total, total))
            current = total
        return out

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        _, total = self.plan(inputs.n_visual_original, inputs.budget_count)[self._layers.index(spec.layer)]
        return min(total, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        selected, total = self.plan(inputs.n_visual_original, inputs.budget_count)[self._layers.index(spec.layer)]
        selected, total = min(selected, inputs.n_visual), min(total, inputs.n_visual)
        score = relevance(inputs)  # (n,)
        order = score.sort(descending=True, stable=True).indices
        keep, pruned = order[:selected], order[selected:]
        clusters = total - selected
        if clusters == 0:
            return KeepDecision(keep.sort().values.cpu(), scores=score)
        candidates = pruned[: int(0.3 * pruned.numel()) + 1]  # most relevant 30% of the pruned, + 1
        noise = torch.rand(candidates.numel(), generator=inputs.generator) * 1e-6
        hidden = inputs.hidden_states.to(score.device)  # (n, d)
        centres, merged = density_peak_merge(hidden[candidates], clusters, noise)
        index = torch.cat([keep, candidates[centres]])
        states = torch.cat([hidden[keep].float(), merged])
        order = index.argsort()
        return KeepDecision(index[order].cpu(), states=states[order].to(hidden.dtype), scores=score)

def layer_schedule(n: int, budget_count: int, layers: list[int], n_layers: int) -> list[int]:
    """Totals after each sparse layer so that the layer-averaged count is ``budget_count``.

    Layers ``0..layers[0]`` keep ``n``; stage ``s`` keeps ``n lam^s`` (lam by bisection); the last stage
    takes up the rounding. Example: n = 576, B = 192, layers (2, 6, 15) of 32 -> about (318, 176, 97).
    """
    edges = [*layers, n_layers - 1]
    widths = [edges[s + 1] - edges[s] for s in range(len(layers))]  # layers in each pruned stage
    ratio = budget_count / n
    first = (layers[0] + 1) / n_layers

    def average(lam: float) -> float:
        return first + sum(w * lam ** (s + 1) for s, w in enumerate(widths)) / n_layers

    if ratio >= 1.0:
        return [n] * len(layers)
    if average(0.0) >= ratio:
        raise MethodError(
            f"sparsevlm: a layer-averaged budget of {budget_count}/{n} tokens is unreachable: layers 0..{layers[0]} "
            f"keep every token ({first:.3f} of the layers); pass a larger --ratio/--budget"
        )
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if average(mid) < ratio else (low, mid)
    totals = [max(1, min(n, round(n * low ** (s + 1)))) for s in range(len(layers) - 1)]
    spent = (layers[0] + 1) * n + sum(w * t for w, t in zip(widths, totals))
    last = round((budget_count * n_layers - spent) / widths[-1])
    return [*totals, max(1, min(last, totals[-1] if totals else n))]
