"""`downsample`: resize the image so the model itself produces about ``budget`` visual tokens.

Not a selection method: it acts at the `input` stage, before preprocessing; the model adapter resizes
(``resize_to_tokens``): Qwen2.5-VL gets a smaller image (same aspect ratio, at most the budget's token
count); LLaVA gets a square image of 14 * floor(sqrt(budget)) px and its CLIP tower interpolates the
position table. VTC-Bench (arXiv
2510.07143) found this simple baseline beats many compression methods, so it is kept honest: the
retained count is what the smaller image produces.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokbench.pruner import Budget, KeepDecision, ModelInfo, Pruner, Stage, StageInputs, StageSpec, register_method


@register_method("downsample")
@dataclass
class Downsample(Pruner):
    budget: Budget | None
    version = "1"
    headline_retention = "input"

    def stages(self, model: ModelInfo) -> list[StageSpec]:
        return [StageSpec(Stage.INPUT)]

    def stage_count(self, spec: StageSpec, inputs: StageInputs) -> int | None:
        return None

    def select(self, spec: StageSpec, inputs: StageInputs) -> KeepDecision:
        raise AssertionError("downsample acts on the image, before any token exists")
