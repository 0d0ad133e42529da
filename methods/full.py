"""`full`: keep every visual token. The reference run every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Pruner, StageInputs, StageSpec, register_method


@register_method("full")
@dataclass
class Full(Pruner):
    """Acts at no stage; the engine then computes exactly what ``model.generate`` computes."""

    budget: Budget | None = None
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        return []

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return inputs.n_visual

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        raise AssertionError("full acts at no stage")
