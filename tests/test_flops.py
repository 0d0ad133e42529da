"""FLOPs: the analytic formulas against torch's own FlopCounterMode (`count_flops`) on the tiny models, and the per-sample
figures a run records (flops_ratio_total < flops_ratio_llm for a pre-LLM method, selection work counted)."""

from __future__ import annotations

import pytest
import torch

from conftest import noise_image
from tokbench.attention import attention_row
from tokbench.engine import Engine
from tokbench.metrics import LLMShape, attention_row_flops, count_flops, flops_ratios, layer_flops, vision_block_flops
from tokbench.pruner import Budget, build_method


def _counted(fn) -> int:
    with torch.no_grad():
        return count_flops(fn)


def test_vision_block_flops_worked_example():
    assert vision_block_flops(4, 2, 4, 3, 16) == 448.0


@pytest.mark.parametrize("size", [(224, 224), (448, 336), (140, 392)])
def test_vision_flops_equal_counted_tower(qwen, size):
    """Qwen2.5-VL: patch embedding + window/full-attention blocks + merger, exactly what torch counts."""
    image = noise_image(*size)
    batch = qwen.preprocess([[image]], ["q"])
    inputs = batch.model_inputs
    with torch.no_grad():
        counted = _counted(lambda: qwen.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]))
    assert qwen.vision_flops(qwen.token_grid(image)) == counted


def test_vision_flops_equal_counted_tower_llava(llava):
    image = noise_image(300, 200)
    batch = llava.preprocess([[image]], ["q"])
    with torch.no_grad():
        counted = _counted(lambda: llava.encode_images(batch))
    assert llava.vision_flops(llava.token_tiles(image)[0].grid) == counted


def test_layer_flops_equal_counted_decoder_layer(adapter):
    """One decoder layer on n tokens: projections, gated MLP and the full attention square."""
    shape = LLMShape.from_config(adapter.text_config)
    layer = adapter.layers[0]
    n = 37
    hidden = torch.randn(1, n, shape.hidden)
    positions = torch.arange(n)[None].expand(adapter.position_rows, 1, n)
    rope = adapter.rotary(hidden, positions)
    with torch.no_grad():
        counted = _counted(lambda: layer(hidden, attention_mask=None, position_embeddings=rope))
    assert layer_flops(shape, n) == counted


def test_attention_row_flops_equal_counted_row(adapter):
    shape = LLMShape.from_config(adapter.text_config)
    n = 29
    hidden = torch.randn(1, n, shape.hidden)
    positions = torch.arange(n)[None].expand(adapter.position_rows, 1, n)
    rope = adapter.rotary(hidden, positions)
    valid = torch.ones(1, n, dtype=torch.bool)
    with torch.no_grad():
        counted = _counted(lambda: attention_row(adapter, adapter.layers[0], hidden, -1, valid, rope))
    assert attention_row_flops(shape, n) == counted


def test_flops_ratios_definition():
    assert flops_ratios(50.0, 30.0, 5.0, 100.0, 30.0) == {"flops_ratio_llm": 0.5, "flops_ratio_total": 85.0 / 130.0}


@pytest.mark.parametrize("method, ratio", [("divprune", 0.25), ("visionzip", 0.25), ("random", 0.25)])
def test_pre_llm_method_total_ratio_above_llm_ratio(adapter, method, ratio):
    """The vision tower is not pruned by a pre-LLM method, so the total ratio is the larger one."""
    engine = Engine(adapter, build_method(method, Budget.ratio(ratio)))
    out = engine.generate([[noise_image(448, 336)]], ["What colour is the square?"], [0], max_new_tokens=2)
    sample = out.samples[0]
    shape = LLMShape.from_config(adapter.text_config)
    from tokbench.metrics import prefill_flops

    n_text = sample.seq_len_per_layer[0] - sample.kept_per_layer[0]
    full_llm = prefill_flops(shape, [n_text + sample.n_visual] * adapter.n_layers)
    ratios = flops_ratios(prefill_flops(shape, sample.seq_len_per_layer), sample.vision_flops, sample.select_flops,
                          full_llm, sample.vision_flops_full)  # fmt: skip
    assert sample.vision_flops == sample.vision_flops_full > 0
    assert ratios["flops_ratio_total"] > ratios["flops_ratio_llm"]
    assert (sample.select_flops > 0) == (method != "random")


def test_select_flops_count_method_work_and_attention_rows(qwen):
    """FastV's selection FLOPs are exactly its one recomputed attention row (the method itself only sorts);
    DivPrune's are its pairwise similarities, counted by torch."""
    image = noise_image(448, 336)
    question = "What colour is the square?"
    fastv = Engine(qwen, build_method("fastv", Budget.ratio(0.5), {"k": "1"}))
    out = fastv.generate([[image]], [question], [0], max_new_tokens=1)
    sample = out.samples[0]
    shape = LLMShape.from_config(qwen.text_config)
    (spec,) = fastv.specs  # the row is the last token's, over every token entering the stage's layer
    assert sample.select_flops == attention_row_flops(shape, sample.seq_len_per_layer[spec.layer])
    divprune = Engine(qwen, build_method("divprune", Budget.ratio(0.25)))
    sample = divprune.generate([[image]], [question], [0], max_new_tokens=1).samples[0]
    n = sample.n_visual
    assert sample.select_flops >= 2 * n * n * qwen.text_config.hidden_size  # the n x n similarity matmul


def test_input_stage_method_counts_the_smaller_tower_pass(qwen):
    engine = Engine(qwen, build_method("downsample", Budget.ratio(0.25)))
    image = noise_image(448, 448)
    sample = engine.generate([[image]], ["q"], [0], max_new_tokens=1).samples[0]
    assert sample.vision_flops < sample.vision_flops_full == qwen.vision_flops(qwen.token_grid(image))
