"""The selection scores the engine hands a method equal the model's own eager attention, on every family.

A recording method asks for the last prompt token's attention at an `llm` stage (layer k's own
projections, ``attention_from="same"``, and layer k+1's on layer k's output, ``"next"``); the same rows
come out of the model's own forward with ``output_attentions=True`` (eager attention), restricted to the
image-token positions. This pins each adapter's query/key projections (Qwen3-VL's q_norm/k_norm), its
rotary embedding (M-RoPE, interleaved M-RoPE, 1-D) and what happens between layers (Qwen3-VL's DeepStack
feeds layers 1.. the hidden states the scores are computed from).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import TINY_FAMILY_MODELS, noise_image, tiny_adapter

from tokbench.engine import Engine
from tokbench.pruner import Budget, KeepDecision, Stage, StageSpec


@dataclass
class Recorder:
    """Keeps every token at llm(layer) and records the attention row it is handed (h, n)."""

    layer: int
    attention_from: str
    budget: Budget | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    name = "recorder"
    version = "test"

    def stages(self, model):
        return [StageSpec(Stage.LLM, layer=self.layer, attention_from=self.attention_from)]

    def stage_count(self, spec, inputs):
        return inputs.n_visual

    def select(self, spec, inputs):
        self.rows.append(inputs.text_attention.clone())
        return KeepDecision(torch.arange(inputs.n_visual))


@pytest.mark.parametrize("family", TINY_FAMILY_MODELS)
@pytest.mark.parametrize(("layer", "attention_from", "model_layer"), [(1, "same", 1), (2, "same", 2), (1, "next", 2)])
def test_engine_attention_rows_equal_the_models_eager_attention(family, layer, attention_from, model_layer):
    adapter = tiny_adapter(family, attn="eager")
    images = [[noise_image(448, 336, seed=5)], [noise_image(224, 224, seed=6)]]
    questions = ["What colour is the small square?", "Where?"]
    recorder = Recorder(layer, attention_from)
    Engine(adapter, recorder).generate(images, questions, [0, 1], 1)
    batch = adapter.preprocess(images, questions)
    with torch.no_grad():
        out = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs,
                            output_attentions=True)  # fmt: skip
    image_positions = batch.input_ids == adapter.image_token_id
    rows = recorder.rows[::2]  # the engine calls select twice per sample: the run, then its FLOP count
    assert len(rows) == 2
    for i, row in enumerate(rows):
        expected = out.attentions[model_layer][i, :, -1][:, image_positions[i]].float()  # (h, n)
        torch.testing.assert_close(row, expected, atol=2e-5, rtol=1e-4)
