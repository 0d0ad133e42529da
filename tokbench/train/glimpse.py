"""Train GlimpsePrune's glimpse token and VIP on a frozen VLM (paper Sec. 3.4; official ``train_qwen_gp.py``).

Recipe, as the official train configs set it: every base-model weight frozen; trained are the per-layer
glimpse embeddings with their Linear + RMSNorm and the VIP; the loss is Dice (x1.0) + BCE (x0.1, official
``MaskLoss``) between the VIP's logits and the mask of visual tokens covered by the ground-truth boxes
(a token is inside when its grid cell lies in a box's cell span: official ``find_indices_of_bbox_on_grid``);
AdamW at lr 1e-4, cosine schedule with 10% warm-up; data: Visual-CoT training records with boxes (the
official run takes 20K random GQA ones, batch 1 x 8 accumulation, one epoch = 2,500 updates).

The forward is the engine's own (``Engine.glimpse_inputs``: the prefill up to the glimpse layer with the
glimpse token appended, M-RoPE positions and padding as at inference), so the VIP learns from exactly
the features it is later given. Deviation (docs/methods.md): the official ``le_loss`` term (the answer's
LM loss in a full pass with the glimpse token present, weight 1.0) is not computed; tokbench removes the
glimpse token before any answer token is produced, as the official inference does.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokbench.models.base import Tile


@dataclass
class GlimpseTrainConfig:
    data: str = "vstar-synth"  # or a Visual-CoT training .jsonl (question, image, bboxs, dataset, ...)
    image_dir: str | None = None  # images of a .jsonl: DIR/cot/<dataset>/<image> (official) or DIR/<image>
    steps: int = 2500
    batch_size: int = 8
    lr: float = 1e-4
    warmup: float = 0.1
    dice_weight: float = 1.0
    bce_weight: float = 0.1
    seed: int = 0
    eval_items: int = 32


@dataclass
class Example:
    image: Image.Image
    question: str
    boxes: list[list[float]]  # pixel xyxy in ``image``


def box_mask(boxes: list[list[float]], tiles: list[Tile], token_tile: torch.Tensor, token_rc: torch.Tensor) -> torch.Tensor:
    """(n,) float target: 1 for tokens whose grid cell falls in a box's cell span (official rule), per tile.

    ``tiles``: the image's token tiles (`ModelAdapter.token_tiles`); each box (pixel xyxy in the image) is
    normalised to the pixels each tile covers (e.g. LLaVA's centre square crop) and clipped to them.
    token_tile (n,), token_rc (n, 2): each token's tile and row/col in it.
    """
    inside = torch.zeros(token_rc.shape[0], dtype=torch.bool)
    for index, tile in enumerate(tiles):
        left, top, right, bottom = tile.box
        width, height = right - left, bottom - top
        rows, cols = tile.grid
        here = token_tile == index
        for x1, y1, x2, y2 in boxes:
            nx1, nx2 = (max(0.0, (x - left) / width) for x in (x1, x2))
            ny1, ny2 = (max(0.0, (y - top) / height) for y in (y1, y2))
            if nx1 >= 1 or ny1 >= 1 or nx2 <= 0 or ny2 <= 0:
                continue  # outside this tile
            c1, r1 = int(nx1 * cols), int(ny1 * rows)
            c2, r2 = min(int(nx2 * cols), cols - 1), min(int(ny2 * rows), rows - 1)
            r, c = token_rc[:, 0], token_rc[:, 1]
            inside |= here & (r >= r1) & (r <= r2) & (c >= c1) & (c <= c2)
    return inside.float()


def mask_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float, bce_weight: float) -> torch.Tensor:
    """Official ``MaskLoss`` for one sample: ``dice_weight * (1 - Dice(sigmoid)) + bce_weight * BCE``."""
    probs = logits.float().sigmoid()
    eps = 1e-6
    dice = 1 - (2 * (probs * target).sum() + eps) / (probs.sum() + target.sum() + eps)
    return dice_weight * dice + bce_weight * F.binary_cross_entropy_with_logits(logits.float(), target)


def synth_examples(seed: int) -> Iterator[Example]:
    """Endless fresh vstar-synth items (the evaluation set's sizes and mix) with the boxes asked about."""
    from tokbench.train.canary import question_text, random_item

    rng = np.random.default_rng([seed, 3])  # disjoint from the evaluation set (seed 0) and the canary's
    while True:
        row, image = random_item(rng)
        yield Example(image, question_text(row), row["bboxes"])


def jsonl_examples(path: Path, image_dir: Path | None, seed: int) -> Iterator[Example]:
    """Visual-CoT training records (official ``viscot_dataset/*_cot_train.jsonl``), shuffled each pass."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records")
    root = Path(image_dir) if image_dir else Path(path).parent
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(records)):
            record = records[i]
            official = root / "cot" / record.get("dataset", "") / record["image"]
            image_path = official if official.exists() else root / record["image"]
            try:
                image = Image.open(image_path).convert("RGB")
            except OSError as err:
                raise ValueError(f"cannot read {image_path} ({err}); pass --image-dir DIR") from err
            yield Example(image, record["question"], record["bboxs"])


def examples(cfg: GlimpseTrainConfig) -> Iterator[Example]:
    if cfg.data == "vstar-synth":
        return synth_examples(cfg.seed)
    if not Path(cfg.data).is_file():
        raise ValueError(f"--data {cfg.data!r}: use vstar-synth or a Visual-CoT training .jsonl file")
    return jsonl_examples(Path(cfg.data), Path(cfg.image_dir) if cfg.image_dir else None, cfg.seed)


class GlimpseTrainer:
    """The glimpse modules of a `glimpseprune` instance, trained through the engine on one model."""

    def __init__(self, adapter, cfg: GlimpseTrainConfig):
        from methods.glimpseprune import GlimpsePrune
        from tokbench.engine import Engine

        self.adapter, self.cfg = adapter, cfg
        self.info = adapter.info()
        self.method = GlimpsePrune(None, allow_untrained=True, seed=cfg.seed)
        self.modules = self.method.modules_for(self.info).to(adapter.device)
        self.modules.base_config = adapter.model.config.to_dict()  # saved with the GP keys (official loader)
        adapter.model.requires_grad_(False)
        self.engine = Engine(adapter, self.method)
        (self.spec,) = self.engine.specs

    def losses(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean ``mask_loss`` over ``batch`` (differentiable) and stats: kept share, box recall."""
        self.engine.probe = self.method.probe(self.info)  # in training mode: carries gradients
        inputs = self.engine.glimpse_inputs([[e.image] for e in batch], [e.question for e in batch])
        losses, kept, recall = [], [], []
        for example, one in zip(batch, inputs):
            logits = self.method.vip_logits(self.spec, one, vip=self.modules.attn_fuser)
            tiles = self.engine.adapter.token_tiles(example.image)
            target = box_mask(example.boxes, tiles, one.token_tile, one.token_rc)
            target = target.to(logits.device)
            losses.append(mask_loss(logits, target, self.cfg.dice_weight, self.cfg.bce_weight))
            chosen = (logits.detach().sigmoid() > self.modules.cfg.reduce_threshold).float()
            kept.append(float(chosen.mean()))
            recall.append(float((chosen * target).sum() / target.sum().clamp(min=1)))
        return torch.stack(losses).mean(), {"kept": float(np.mean(kept)), "recall": float(np.mean(recall))}

    def train(self, log: Callable[[str], None] = print) -> dict:
        from transformers import get_cosine_schedule_with_warmup

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        stream = examples(cfg)
        held_out = list(itertools.islice(examples(replace(cfg, seed=cfg.seed + 1)), cfg.eval_items))
        optimizer = torch.optim.AdamW(self.modules.parameters(), lr=cfg.lr)
        schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup * cfg.steps), cfg.steps)
        history, start = [], time.time()
        for step in range(cfg.steps):
            self.modules.train()
            loss, _ = self.losses([next(stream) for _ in range(cfg.batch_size)])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            history.append(float(loss))
            if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
                stats = self.evaluate(held_out)
                log(f"step {step + 1}/{cfg.steps}  loss {np.mean(history[-25:]):.3f}  held-out loss {stats['loss']:.3f}  "
                    f"kept {stats['kept']:.3f}  box recall {stats['recall']:.2f}  {time.time() - start:.0f}s")  # fmt: skip
        self.modules.eval()
        return {"train_loss": history, **self.evaluate(held_out), "seconds": time.time() - start}

    @torch.no_grad()
    def evaluate(self, held_out: list[Example]) -> dict[str, float]:
        self.modules.eval()
        loss, stats = self.losses(held_out)
        return {"loss": float(loss), **stats}

    def save(self, directory: Path) -> Path:
        """``config.json`` (the base model's config + the GP keys) + ``new_modules_gp.pt`` in the official
        layout: what the plugin loads, and what the official ``load_new_modules`` loads (Qwen2.5-VL)."""
        self.method.save_weights(directory)
        return Path(directory)
