"""GlimpsePrune training: the box mask rule, the official mask loss, learning through the engine, the saved layout."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from methods.glimpse_vip import GlimpseModules
from tokbench.cli import app
from tokbench.config import load_config
from tokbench.models import load_model
from tokbench.train.glimpse import GlimpseTrainConfig, GlimpseTrainer, box_mask, mask_loss, synth_examples


def _rc(rows: int, cols: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)


def test_box_mask_marks_the_cells_a_box_spans():
    # 448 x 336 image, 12 x 16 grid of 28 px cells: x 60..110 lies in cols 2..3, y 30..50 in row 1
    mask = box_mask([[60, 30, 110, 50]], (448, 336), (12, 16), _rc(12, 16), "qwen2_5_vl").reshape(12, 16)
    expected = torch.zeros(12, 16)
    expected[1, 2:4] = 1
    assert torch.equal(mask, expected)
    edge = box_mask([[400, 300, 448, 336]], (448, 336), (12, 16), _rc(12, 16), "qwen2_5_vl").reshape(12, 16)
    assert edge[-1, -1] == 1 and edge.sum() == 2 * 2  # the right/bottom edge clamps to the last cell


def test_box_mask_follows_llavas_centre_crop():
    # 448 x 336 image: LLaVA sees the centre 336 x 336 (x 56..392) as a 4 x 4 grid
    inside = box_mask([[70, 10, 130, 60], [300, 250, 380, 330]], (448, 336), (4, 4), _rc(4, 4), "llava").reshape(4, 4)
    expected = torch.zeros(4, 4)
    expected[0, 0] = 1  # x 14..74, y 10..60 of the crop: its first 84 px cell
    expected[2:4, 2:4] = 1  # x 244..324, y 250..330: cells 2..3 both ways
    assert torch.equal(inside, expected)
    cropped = box_mask([[0, 0, 40, 40]], (448, 336), (4, 4), _rc(4, 4), "llava")
    assert cropped.sum() == 0  # entirely left of the crop


def test_mask_loss_is_the_official_dice_plus_weighted_bce():
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5])
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum() + 1e-6) / (p.sum() + target.sum() + 1e-6)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.isclose(mask_loss(logits, target, 1.0, 0.1), dice + 0.1 * bce)
    assert mask_loss(target * 40 - 20, target, 1.0, 0.1) < 1e-6  # a confident right answer costs nothing


def test_training_through_the_engine_fits_the_box_masks():
    adapter = load_model("tiny-qwen2.5-vl-random", load_config().models, dtype="float32", device="cpu")
    trainer = GlimpseTrainer(adapter, GlimpseTrainConfig())
    stream = synth_examples(0)
    batch = [next(stream) for _ in range(4)]
    params = [p for p in trainer.modules.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    losses = []
    for _ in range(27):
        trainer.modules.train()
        loss, stats = trainer.losses(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    glimpse = trainer.modules.learnable_embeddings
    assert glimpse.grad is not None and glimpse.grad.abs().sum() > 0  # gradients reach the glimpse token
    assert not any(p.requires_grad for p in adapter.model.parameters())  # the base stays frozen
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]  # from ~1 (Dice of an unselective VIP) down
    assert stats["recall"] > 0.4 and stats["kept"] < 0.2  # the box tokens, not everything


def test_train_glimpse_writes_what_the_plugin_loads(tmp_path):
    out = tmp_path / "gp"
    result = CliRunner().invoke(app, ["train-glimpse", "--model", "tiny-qwen2.5-vl-random", "--steps", "2",
                                      "--batch-size", "2", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"config.json", "new_modules_gp.pt"}
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl_gp"
    GlimpseModules.load(out)  # strict keys and shapes
    run = CliRunner().invoke(app, ["run", "--method", "glimpseprune", "--method-arg", f"weights={out}",
                                   "--model", "tiny-qwen2.5-vl-random", "--task", "vstar-synth", "--limit", "2",
                                   "--output", str(tmp_path / "runs")])  # fmt: skip
    assert run.exit_code == 0, run.output


def test_train_glimpse_refuses_unknown_data(tmp_path):
    result = CliRunner().invoke(app, ["train-glimpse", "--model", "tiny-qwen2.5-vl-random", "--data", "nope.jsonl",
                                      "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and "vstar-synth or a Visual-CoT" in result.output


def test_visual_cot_training_records_are_read_in_the_official_layout(tmp_path):
    from PIL import Image

    from tokbench.train.glimpse import jsonl_examples

    (tmp_path / "cot" / "gqa").mkdir(parents=True)
    Image.new("RGB", (100, 80), "white").save(tmp_path / "cot" / "gqa" / "a.jpg")
    record = {"question": "Q?", "answer": "A", "image": "a.jpg", "width": 100, "height": 80,
              "bboxs": [[10, 10, 60, 60]], "dataset": "gqa", "split": "train"}  # fmt: skip
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    example = next(jsonl_examples(tmp_path / "train.jsonl", tmp_path, 0))
    assert example.question == "Q?" and example.boxes == [[10, 10, 60, 60]] and example.image.size == (100, 80)
