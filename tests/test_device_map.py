"""``--device-map``: a model dispatched by accelerate in layer groups runs through the engine unchanged.

This machine has no second device, so the groups all map to ``cpu``; what is tested is the mechanics a
multi-GPU run relies on: the checkpoint loads with the map, accelerate's dispatch hooks sit on every group
(transformers attaches them when a map names several devices; here they are forced, as ``force_hooks``
does), the engine asks each layer for its device and moves the sequence there, and the dispatched model's
predictions equal the single-device model's token for token.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import dispatch_model
from conftest import noise_image, tiny_adapter
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.config import load_config
from tokbench.engine import Engine
from tokbench.models import ModelError, load_model, resolve_device_map
from tokbench.pruner import Budget, build_method
from tokbench.sequence import Sequence


def _split_map(tmp_path, adapter) -> str:
    """A device map putting the vision tower, embeddings and every pair of decoder layers in its own group."""
    text = "model.language_model"
    groups = {"model.visual": "cpu", f"{text}.embed_tokens": "cpu", f"{text}.norm": "cpu", f"{text}.rotary_emb": "cpu",
              "lm_head": "cpu"}  # fmt: skip
    groups.update({f"{text}.layers.{i}": "cpu" for i in range(adapter.n_layers)})
    path = tmp_path / "map.json"
    path.write_text(json.dumps(groups))
    return str(path)


def test_a_dispatched_model_predicts_what_the_single_device_model_does(tmp_path, monkeypatch):
    single = tiny_adapter("tiny-qwen2.5-vl")
    path = _split_map(tmp_path, single)
    split = load_model("tiny-qwen2.5-vl", load_config().models, dtype="float32", device="cpu", device_map=path)
    dispatch_model(split.model, device_map=json.loads(open(path).read()), force_hooks=True)
    assert hasattr(split.layers[1], "_hf_hook") and hasattr(split.model.lm_head, "_hf_hook")
    asked, moved = [], []
    original_device, original_to = type(split).layer_device, Sequence.to
    monkeypatch.setattr(type(split), "layer_device", lambda self, i: asked.append(i) or original_device(self, i))
    monkeypatch.setattr(Sequence, "to", lambda self, device: moved.append(str(device)) or original_to(self, device))
    images = [[noise_image(448, 336, seed=1)], [noise_image(224, 224, seed=2)]]
    questions = ["What colour is the square?", "Where is it?"]
    for method in (build_method("full", Budget.full()), build_method("fastv", Budget.ratio(0.5), {"k": "1"})):
        expected = Engine(single, method).generate(images, questions, [0, 1], 6)
        asked.clear()
        got = Engine(split, method).generate(images, questions, [0, 1], 6)
        assert [s.tokens for s in got.samples] == [s.tokens for s in expected.samples]
        assert asked == list(range(split.n_layers))  # the engine asks every layer where it runs, in order
        torch.testing.assert_close(got.first_logits, expected.first_logits)
    assert moved and set(moved) == {"cpu"}


def test_bad_device_maps_are_refused_in_one_line(tmp_path):
    assert resolve_device_map(None, "cuda") == "cuda" and resolve_device_map("auto", "cpu") == "auto"
    with pytest.raises(ModelError, match="not auto/balanced/sequential and not a readable JSON file"):
        resolve_device_map(str(tmp_path / "missing.json"), "cpu")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="must map module names to devices"):
        resolve_device_map(str(tmp_path / "list.json"), "cpu")
    result = CliRunner().invoke(app, ["run", "--method", "full", "--task", "vstar-synth", "--limit", "1",
                                      "--device-map", str(tmp_path / "missing.json"), "--output", str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--device-map" in result.output and not (tmp_path / "r").exists()
