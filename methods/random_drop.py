"""`random`: keep a uniformly random subset of the visual tokens before the LLM (seeded, exact count)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Pruner, Stage, StageInputs, StageSpec, register_method


@register_method("random")
@dataclass
class Random(Pruner):
    """Seeded per document by the engine (run seed, doc id), so runs reproduce whatever the batching."""

    budget: Budget | None
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        return [StageSpec(Stage.EMBED)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return inputs.budget_count

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        order = torch.randperm(inputs.n_visual, generator=inputs.generator)
        return KeepDecision(order[: inputs.budget_count].sort().values)
