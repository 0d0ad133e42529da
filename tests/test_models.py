"""Model loading: aliases, local paths, tiny checkpoints through from_pretrained, real-size configs."""

from __future__ import annotations

import pytest
import torch

from tokbench.config import load_config
from tokbench.models import ModelError, load_model, resolve_model
from tokbench.models.random_weights import build_random, config_name, shipped_configs
from tokbench.models.tiny import ensure_tiny


def test_aliases_and_hub_ids_resolve():
    aliases = load_config().models
    assert resolve_model("qwen2.5-vl-7b", aliases) == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert resolve_model("llava-1.5-7b", aliases) == "llava-hf/llava-1.5-7b-hf"
    assert resolve_model("someorg/some-vlm", aliases) == "someorg/some-vlm"
    with pytest.raises(ModelError, match="did you mean tiny-llava"):
        resolve_model("tiny-lava", aliases)


def test_missing_hub_model_offline_is_a_clear_error():
    with pytest.raises(ModelError, match="not a local checkpoint and not in the HF cache"):
        load_model("someorg/not-a-real-vlm", {}, device="cpu")


def test_tiny_checkpoint_loads_by_path_like_a_hub_model():
    path = ensure_tiny("tiny-llava")
    adapter = load_model(str(path), {}, dtype="float32", device="cpu")
    assert adapter.family == "llava" and adapter.n_layers == 4
    assert adapter.model.config._attn_implementation == "sdpa"
    assert adapter.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "params_b", "layers"),
    [("qwen2.5-vl-3b", 3.75, 36), ("qwen2.5-vl-7b", 8.29, 28), ("llava-1.5-7b", 7.06, 32), ("llava-1.5-13b", 13.35, 40)],
)
def test_real_size_configs_match_released_parameter_counts(name, params_b, layers):
    model, _ = build_random(name, torch.bfloat16, "sdpa", "meta")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(params_b, abs=0.01)
    assert model.config.get_text_config().num_hidden_layers == layers


def test_random_weights_names():
    assert config_name("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct") == "qwen2.5-vl-7b"
    assert config_name("my-alias", "llava-hf/llava-1.5-13b-hf") == "llava-1.5-13b"
    assert set(shipped_configs()) == {
        "qwen2.5-vl-3b", "qwen2.5-vl-7b", "llava-1.5-7b", "llava-1.5-13b", "qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b",
        "internvl3-1b", "internvl3-2b", "internvl3-8b",
    }
    with pytest.raises(ValueError, match="no shipped config"):
        config_name("tiny-llava", "tiny:tiny-llava")


def test_sincos_positions_encode_column_then_row():
    from tokbench.models.tiny import sincos_positions

    table = sincos_positions(4, 16).reshape(4, 4, 16)  # (row, col, d)
    assert torch.equal(table[0, :, :8], table[3, :, :8])  # first half: the column only
    assert torch.equal(table[:, 0, 8:], table[:, 3, 8:])  # second half: the row only
    assert torch.allclose(table[..., :4] ** 2 + table[..., 4:8] ** 2, torch.ones(4, 4, 4))  # sin, cos pairs
    assert torch.equal(table[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert torch.allclose(table[0, 1, 0], torch.sin(torch.tensor(1.0)))  # frequency 1 rad per patch first
    assert len({tuple(v.tolist()) for v in table.reshape(16, 16)}) == 16


def test_tiny_llava_tower_starts_from_the_sincos_table():
    from tokbench.models.tiny import sincos_positions

    adapter = load_model(str(ensure_tiny("tiny-llava-random")), {}, dtype="float32", device="cpu")
    table = adapter.model.model.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(table[0], torch.zeros(32)) and torch.allclose(table[1:], sincos_positions(16, 32))
