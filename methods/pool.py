"""`pool`: 2-D average pooling of the visual token grid down to the budget (a common baseline).

The grid (rows x cols) is pooled adaptively to (r', c') with r'c' <= budget and the aspect ratio kept;
each pooled token takes the position of the token at its cell's centre. The kept count is r'c', which
may fall a little under the budget when the budget does not factor to the grid's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Pruner, Stage, StageInputs, StageSpec, register_method


def pooled_grid(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The largest (r', c') with r' <= rows, c' <= cols, r'c' <= budget, r'/c' close to rows/cols."""
    best = (1, 1)
    for r in range(1, rows + 1):
        c = min(cols, budget // r, max(1, round(r * cols / rows)))
        if c >= 1 and r * c <= budget and r * c > best[0] * best[1]:
            best = (r, c)
    return best


@register_method("pool")
@dataclass
class Pool(Pruner):
    budget: Budget | None
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        return [StageSpec(Stage.EMBED)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return math.prod(pooled_grid(*inputs.grid_hw, inputs.budget_count))

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        rows, cols = inputs.grid_hw
        if inputs.n_visual != rows * cols:
            raise ValueError(f"pool needs one full image grid ({rows}x{cols}), got {inputs.n_visual} tokens")
        out_r, out_c = pooled_grid(rows, cols, inputs.budget_count)
        grid = inputs.visual_embeds.T.reshape(1, -1, rows, cols).float()  # (1, d, rows, cols)
        pooled = F.adaptive_avg_pool2d(grid, (out_r, out_c))[0].flatten(1).T  # (r'c', d)
        centre_r = ((torch.arange(out_r) + 0.5) * rows / out_r).long().clamp(max=rows - 1)
        centre_c = ((torch.arange(out_c) + 0.5) * cols / out_c).long().clamp(max=cols - 1)
        index = (centre_r[:, None] * cols + centre_c[None, :]).flatten()
        return KeepDecision(index, states=pooled.to(inputs.visual_embeds.dtype))
