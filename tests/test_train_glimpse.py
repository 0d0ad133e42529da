"""GlimpsePrune training: the box mask rule, the official mask loss, learning through the engine, the saved layout
(checkpoints the official loader can read, and official ones tokbench reads)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from methods.glimpse_vip import GlimpseModules
from methods.glimpseprune import default_config
from tokbench.cli import app
from tokbench.config import load_config
from tokbench.models import load_model
from tokbench.models.base import Tile
from tokbench.train.glimpse import GlimpseTrainConfig, GlimpseTrainer, box_mask, mask_loss, synth_examples

# The attributes the official Qwen2_5_VL_GPConfig adds to Qwen2_5_VLConfig (transformers_gp/models/qwen2_5_vl/
# configuration.py); its save_new_modules writes them with the whole model config.
OFFICIAL_GP_KEYS = (
    "selected_layers", "use_attention_logits", "attn_fuse_type", "attn_fuse_size", "attn_fuse_global",
    "selected_visual_layers", "visual_cond_size", "attn_fuse_num_heads", "attn_fuse_hidden_act",
    "ori_attn_supervision", "deep_supervision", "le_layers", "le_length", "le_dropout_prob", "le_norm_type",
    "reduce_threshold", "use_ref_masks", "use_zero_masks", "reduce_layer", "anchor_positions", "min_remain_num",
    "max_remain_ratio",
)  # fmt: skip
# Text settings transformers 4.51 (the official pin) reads from the top level of a Qwen2.5-VL config.
FLAT_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "use_sliding_window", "sliding_window", "max_window_layers",
    "attention_dropout",
)  # fmt: skip


def _official_config(base: dict, modules: GlimpseModules) -> dict:
    """config.json as the official save_new_modules writes it under transformers 4.51: the model config with
    flat text settings and mrope rope_scaling, plus every GP attribute, model_type qwen2_5_vl_gp."""
    text = base["text_config"]
    out = {key: value for key, value in base.items() if key != "text_config"}
    out.update({key: text[key] for key in FLAT_TEXT_KEYS})
    rope = text["rope_parameters"]
    out.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    cfg = modules.cfg
    gp = {"le_dropout_prob": 0.0, "use_ref_masks": False, "use_zero_masks": False, "rms_norm_eps": cfg.rms_norm_eps}
    for key in OFFICIAL_GP_KEYS:
        value = gp[key] if key in gp else getattr(cfg, key)
        gp[key] = list(value) if isinstance(value, tuple) else value
    return {**out, **gp, "model_type": "qwen2_5_vl_gp"}


def _official_loader_shapes(config_path) -> tuple[dict, object]:
    """What the official load_new_modules does with config.json: the model config class reads the whole
    file. Returns the parameter shapes of a model built from it, and the config."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_json_file(str(config_path))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}, config


def _rc(rows: int, cols: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)


def _one_tile(rows: int, cols: int, box) -> tuple[list[Tile], torch.Tensor, torch.Tensor]:
    return [Tile((rows, cols), box)], torch.zeros(rows * cols, dtype=torch.long), _rc(rows, cols)


def test_box_mask_marks_the_cells_a_box_spans():
    # 448 x 336 image, one 12 x 16 tile over all of it (28 px cells): x 60..110 lies in cols 2..3, y 30..50 in row 1
    tiles, tile, rc = _one_tile(12, 16, (0, 0, 448, 336))
    mask = box_mask([[60, 30, 110, 50]], tiles, tile, rc).reshape(12, 16)
    expected = torch.zeros(12, 16)
    expected[1, 2:4] = 1
    assert torch.equal(mask, expected)
    edge = box_mask([[400, 300, 448, 336]], tiles, tile, rc).reshape(12, 16)
    assert edge[-1, -1] == 1 and edge.sum() == 2 * 2  # the right/bottom edge clamps to the last cell


def test_box_mask_follows_a_centre_crop_tile():
    # 448 x 336 image: LLaVA's one tile is the centre 336 x 336 (x 56..392), a 4 x 4 grid
    tiles, tile, rc = _one_tile(4, 4, (56, 0, 392, 336))
    inside = box_mask([[70, 10, 130, 60], [300, 250, 380, 330]], tiles, tile, rc).reshape(4, 4)
    expected = torch.zeros(4, 4)
    expected[0, 0] = 1  # x 14..74, y 10..60 of the crop: its first 84 px cell
    expected[2:4, 2:4] = 1  # x 244..324, y 250..330: cells 2..3 both ways
    assert torch.equal(inside, expected)
    cropped = box_mask([[0, 0, 40, 40]], tiles, tile, rc)
    assert cropped.sum() == 0  # entirely left of the crop


def test_box_mask_marks_every_tile_a_box_falls_in():
    # two 2 x 2 tiles side by side over a 200 x 100 image, then a 2 x 2 thumbnail of all of it
    tiles = [Tile((2, 2), (0, 0, 100, 100)), Tile((2, 2), (100, 0, 200, 100)), Tile((2, 2), (0, 0, 200, 100))]
    tile = torch.arange(3).repeat_interleave(4)
    rc = _rc(2, 2).repeat(3, 1)
    mask = box_mask([[110, 10, 140, 40]], tiles, tile, rc)
    # second tile: its cell (0, 0); thumbnail: x 110..140 of 200 is col 1, y 10..40 of 100 is row 0
    assert mask.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]


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
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl_gp" and set(OFFICIAL_GP_KEYS) <= set(config)
    model = load_model("tiny-qwen2.5-vl-random", load_config().models, dtype="float32", device="cpu").model
    shapes, official = _official_loader_shapes(out / "config.json")  # the official loader reads the whole file
    assert shapes == {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert official.image_token_id == model.config.image_token_id and official.reduce_layer == 2
    assert config["hidden_size"] == model.config.text_config.hidden_size  # the text settings at the top level too
    GlimpseModules.load(out)  # strict keys and shapes
    run = CliRunner().invoke(app, ["run", "--method", "glimpseprune", "--method-arg", f"weights={out}",
                                   "--model", "tiny-qwen2.5-vl-random", "--task", "vstar-synth", "--limit", "2",
                                   "--output", str(tmp_path / "runs")])  # fmt: skip
    assert run.exit_code == 0, run.output


def test_checkpoints_round_trip_with_the_official_layout(tmp_path):
    adapter = load_model("tiny-qwen2.5-vl-random", load_config().models, dtype="float32", device="cpu")
    base = adapter.model.config.to_dict()
    modules = GlimpseModules(default_config(adapter.info())).init_untrained(5)
    official = json.loads(json.dumps(_official_config(base, modules)))  # as read back from the file
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "config.json").write_text(json.dumps(official))
    torch.save(modules.official_state(), tmp_path / "official" / "new_modules_gp.pt")

    # official checkpoint in
    loaded = GlimpseModules.load(tmp_path / "official")
    assert loaded.cfg == modules.cfg
    for (name, a), (_, b) in zip(modules.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    # tokbench checkpoint out: every official key with its value, the same tensors under the same names
    loaded.save(tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert {key: ours.get(key) for key in official} == official
    theirs = torch.load(tmp_path / "official" / "new_modules_gp.pt", weights_only=True)
    again = torch.load(tmp_path / "ours" / "new_modules_gp.pt", weights_only=True)
    shapes = {k: {n: t.shape for n, t in v.items()} if isinstance(v, dict) else v.shape for k, v in theirs.items()}
    assert {k: {n: t.shape for n, t in v.items()} if isinstance(v, dict) else v.shape for k, v in again.items()} == shapes

    # the official loader replaces the model config with the file: it must describe the same model
    want = {name: tuple(p.shape) for name, p in adapter.model.state_dict().items()}
    shapes, config = _official_loader_shapes(tmp_path / "ours" / "config.json")
    assert shapes == want and config.image_token_id == base["image_token_id"] and config.selected_layers == [2]
    flat = {key: value for key, value in ours.items() if key != "text_config"}  # what transformers 4.51 reads
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    assert _official_loader_shapes(tmp_path / "flat.json")[0] == want


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
