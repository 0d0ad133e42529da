"""`vscan`: VScan (Zhang et al., TMLR 2026, arXiv 2505.22654), Sec. 4.1 and 4.2.

Notation: ``n`` visual tokens, ``d`` LLM hidden size, ``h`` heads, ``L`` LLM layers, ``B`` budget
(the layer-averaged visual token count over all the sample's visual tokens), ``T1``/``T2`` tokens kept
by stage 1/2.

Two official ports exist, LLaVA-1.5 (CLIP tower) and Qwen2.5-VL; tokbench picks each setting from the
model's capabilities (`ModelInfo`), never its family:

Stage 1, `vision` (Sec. 4.1, "complementary global and local scans with token merging"):
- local scan: split each tile's token grid into windows and keep the highest-scoring tokens of each
  window by a shallow block's attention. Block: on a tower without windowed attention
  (``not vision_windowed``; LLaVA port) block ``round(local_depth * depth)`` (CLIP block 5 of 24); on a
  windowed tower (Qwen port) the first full-attention block (7), the shallowest with attention
  statistics. Window side (``window``, 0 = default): on a tower with a CLS token (``has_cls``; LLaVA
  port) the tile's rows // 4 (6x6-token windows = 4x4 windows over 24x24), else 4 tokens (the Qwen
  port's 4x4-token windows, Qwen's own 112 px attention window). Windows never straddle tiles: every
  tile gets its own (``StageInputs.token_tile``). Tokens are taken in descending score, each window
  capped at ``ceil(local / windows)`` (windows of all tiles counted); rows/columns left over by the
  window size join the last window of their tile (official Qwen ``window_selection``; with a count
  divisible by the windows this is LLaVA's exact per-window top-k);
- global scan: the highest-scoring remaining tokens by a deep block's attention (non-windowed tower:
  the feature block, CLIP -2; windowed: the last full-attention block), local picks excluded;
  ``local = floor(T1 (1 - global_share))``, ``global = T1 - local`` with ``global_share = 0.5``;
- merging: every unselected token joins its most cosine-similar selected token; each selected token
  becomes ``(self + sum(members)) / (1 + count)``. As in the official code this acts on the projected
  visual tokens (LLM space: after ``mm_projector`` for LLaVA, after the merger for Qwen).
Scores: CLS attention averaged over heads (towers with a CLS token), or attention received (sum over
heads, mean over queries and over each merge unit), as the official code computes them.

Stage 2, `llm` (Sec. 4.2, middle-layer pruning): after layer ``round(mid_layer L) - 1`` keep the ``T2``
tokens the last prompt token attends to most (softmax over all keys, mean over heads), scored with the
next layer's q/k projections (official ``layer_prune`` uses ``layers[16]`` after 16 layers). RoPE on
q/k when scoring (``score_rope``, None = default): on for 1-D RoPE (``position_rows == 1``; the LLaVA
port applies it), off for M-RoPE (the Qwen port does not). Official: LLaVA layer 16 of 32, Qwen 14 of 28.

Budget (``headline_retention = "layer_avg"``): with ``p = mid_layer`` and ``s = mid_keep``,
``T1 = round(B / (p + (1 - p) s))`` (at most ``n``) and ``T2 = round((B - p T1) / (1 - p))``, so that
the average over layers is ``B``: LLaVA 64 -> 96 / 32 (the official scripts), 128 -> 192 / 64,
192 -> 288 / 96; Qwen ``--ratio 0.111`` -> 16.7% then a third of it (official 0.167 / 0.333).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.tiles import token_tiles
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
    is_dynamic,
    register_method,
)


def stage_counts(budget: int, n: int, mid_layer: float, mid_keep: float) -> tuple[int, int]:
    """(T1, T2) for a layer-averaged budget: ``stage_counts(64, 576, 0.5, 1/3) == (96, 32)``."""
    t1 = min(n, max(1, round(budget / (mid_layer + (1 - mid_layer) * mid_keep))))
    t2 = round((budget - mid_layer * t1) / (1 - mid_layer))
    return t1, min(t1, max(1, t2))


def window_ids(
    token_rc: torch.Tensor, token_tile: torch.Tensor, tile_grids: list[tuple[int, int]], windows: list[int]
) -> torch.Tensor:
    """(n,) window id of each token: tile ``t`` (grid ``tile_grids[t]``) is cut into ``windows[t]``-token
    squares, leftover rows/cols joining the last window of its row/column; ids count tile by tile.

    token_rc (n, 2) row/col within the tile, token_tile (n,) tile index. Example: tiles (2, 4) and (2, 2)
    with windows [2, 2]: tile 0 has windows 0, 1; tile 1 window 2.
    """
    ids = torch.empty_like(token_tile)
    offset = 0
    for t, ((rows, cols), window) in enumerate(zip(tile_grids, windows)):
        n_h, n_w = max(1, rows // window), max(1, cols // window)
        here = token_tile == t
        r = (token_rc[here, 0] // window).clamp(max=n_h - 1)
        c = (token_rc[here, 1] // window).clamp(max=n_w - 1)
        ids[here] = offset + r * n_w + c
        offset += n_h * n_w
    return ids


def default_windows(tile_grids: list[tuple[int, int]], cls: bool) -> list[int]:
    """Window side per tile: rows // 4 with a CLS tower (LLaVA port: 4x4 windows per grid), else 4 (Qwen port)."""
    return [max(1, rows // 4) if cls else 4 for rows, _ in tile_grids]


def local_scan(score: torch.Tensor, windows: torch.Tensor, count: int) -> torch.Tensor:
    """Up to ``count`` tokens by descending ``score``, at most ``ceil(count / n_windows)`` per window.

    Equivalent to the official greedy loop: a token is taken iff its rank inside its window is below
    the cap, until ``count`` tokens are taken. Returns indices (LongTensor, (<= count,)).
    """
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    n_windows = int(windows.max()) + 1
    cap = math.ceil(count / n_windows)
    order = score.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    for w in windows.unique():  # rank of each token inside its window, by score
        members = order[windows[order] == w]
        rank[members] = torch.arange(members.numel(), device=score.device)
    eligible = order[rank[order] < cap]  # descending score
    return eligible[:count]


def merge_into_kept(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n, d) tokens, sorted ``keep`` -> (k, d): kept token = (self + sum(joined)) / (1 + count)."""
    is_kept = torch.zeros(states.shape[0], dtype=torch.bool, device=states.device)
    is_kept[keep] = True
    kept, others = states[keep].float(), states[~is_kept].float()
    if others.shape[0] == 0:
        return states[keep]
    nearest = (F.normalize(others, dim=-1) @ F.normalize(kept, dim=-1).T).argmax(dim=1)  # (n - k,)
    merged = kept.index_add(0, nearest, others)
    counts = 1 + torch.bincount(nearest, minlength=kept.shape[0]).float()
    return (merged / counts[:, None]).to(states.dtype)


def _scan_score(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) CLS attention averaged over heads (towers with CLS) or attention received (the others)."""
    return stats["cls"].float().mean(dim=0) if "cls" in stats else stats["received"].float()


@register_method("vscan")
@dataclass
class VScan(Pruner):
    """Global + local scans with merging in the vision stage, then middle-layer pruning in the LLM."""

    budget: Budget | None
    mid_layer: float = 0.5  # stage 2 after this fraction of the layers: 16 of 32 (LLaVA), 14 of 28 (Qwen)
    mid_keep: float = 1 / 3  # T2 / T1: 32 of 96 (LLaVA), 0.333 (Qwen)
    global_share: float = 0.5  # share of T1 from the global scan
    window: int = 0  # window side in tokens; 0: the tile's rows // 4 with a CLS tower (6 at 24x24), else 4
    local_depth: float = 5 / 24  # the shallow block on a non-windowed tower, as a fraction of it (CLIP 5 of 24)
    score_rope: bool | None = None  # RoPE when scoring stage 2; None: on for 1-D RoPE, off for M-RoPE
    version = "1"
    headline_retention = "layer_avg"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        if is_dynamic(self.budget):
            raise BudgetError("vscan needs a ratio or token budget, not a dynamic one; pass --ratio or --budget")
        layers = model.n_layers
        rank = round(self.mid_layer * layers)  # layers run on T1 tokens
        if not 1 <= rank <= layers - 1:
            raise MethodError(
                f"vscan: mid_layer={self.mid_layer} puts stage 2 after {rank} of {layers} layers; it needs 1..{layers - 1}: "
                f"pass --method-arg mid_layer=F with {1 / layers:.3g} <= F <= {(layers - 1) / layers:.3g}"
            )
        if not 0 < self.mid_keep <= 1:
            raise MethodError(f"vscan: mid_keep={self.mid_keep} must lie in (0, 1] (T2 / T1; default 1/3)")
        for key in ("global_share", "local_depth"):
            if not 0 <= getattr(self, key) <= 1:
                raise MethodError(f"vscan: {key}={getattr(self, key)} must lie in [0, 1]")
        if self.window < 0:
            raise MethodError(f"vscan: window={self.window} must be >= 0 (0: the default from the tile grid)")
        rope = model.position_rows == 1 if self.score_rope is None else self.score_rope
        return [
            StageSpec(Stage.VISION, vision_attention=self.scan_blocks(model)),
            StageSpec(Stage.LLM, layer=rank - 1, attention_from="next", attention_rope=rope),
        ]

    def scan_blocks(self, model: ModelInfo) -> tuple[int, int]:
        """(local, global) vision blocks: windowed towers have attention statistics only at full-attention
        blocks, so the first and last of them (Qwen port: 7, 31); otherwise block ``round(local_depth *
        depth)`` and the feature block (LLaVA port: 5 and 22 of 24)."""
        if model.vision_windowed:
            full = sorted(model.vision_full_attention)
            return full[0], full[-1]
        depth = model.vision_depth
        return min(depth - 1, round(self.local_depth * depth)), model.vision_feature_layer % depth

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        if inputs.budget_count is None:
            raise ValueError("vscan needs a ratio or token budget, not a dynamic one")
        t1, t2 = stage_counts(inputs.budget_count, inputs.n_visual_original, self.mid_layer, self.mid_keep)
        return t1 if spec.stage == Stage.VISION else min(t2, inputs.n_visual)

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        count = self.stage_count(spec, inputs)
        if spec.stage == Stage.LLM:
            score = inputs.text_attention.float().mean(dim=0)  # (h, n) -> (n,)
            return KeepDecision(score.topk(count).indices.sort().values, scores=score)
        local_block, global_block = spec.vision_attention
        stats = inputs.extras["vision_attention"]
        embeds = inputs.visual_embeds  # (n, d)
        if count >= inputs.n_visual:
            return KeepDecision(torch.arange(inputs.n_visual, device=embeds.device))
        grids = inputs.tile_grids
        sides = [self.window] * len(grids) if self.window else default_windows(grids, "cls" in stats[local_block])
        windows = window_ids(inputs.token_rc, token_tiles(inputs), grids, sides).to(embeds.device)
        shallow = _scan_score(stats[local_block]).to(embeds.device)
        local = local_scan(shallow, windows, int(count * (1 - self.global_share)))
        deep = _scan_score(stats[global_block]).to(embeds.device)
        deep[local] = float("-inf")  # the official code zeroes them; -inf also covers all-zero scores
        keep = torch.cat([local, deep.topk(count - local.numel()).indices]).sort().values
        return KeepDecision(keep, states=merge_into_kept(embeds, keep), scores=deep)
