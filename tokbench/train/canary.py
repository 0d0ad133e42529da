"""Train the tiny canary VLMs from scratch on CPU: vstar-synth questions whose answer is a few tokens.

The canary makes the offline default meaningful: full tokens answer well, pruning the target square's
tokens answers at chance, so a method that keeps the wrong tokens visibly loses accuracy.

Recipe (measured on a 2-core CPU, see docs/canary.md): the tiny architecture of ``tokbench.models.tiny``
from its seeded random init; batches of freshly drawn vstar-synth items (both categories, the evaluation
set's category mix, seeds disjoint from it); the exact evaluation prompt (lmms-eval's vstar_bench
``doc_to_text`` with the task's post-prompt, the adapter's chat template); loss on the answer letter and
the end-of-turn token only; AdamW with warm-up, a stable phase and a cosine decay over the last 20%.
A curriculum makes the search learnable: a 32 px square among 256 tokens gives a randomly initialised
model almost no gradient (it stays at chance for hundreds of steps), while 64 px squares on 224 px
images (64 tokens) are learned in about 200 steps. Images grow from ``start_size`` to the task's 448 px
and squares shrink from ``start_side`` to the task's 32 px between ``warm`` and ``settle`` (fractions
of the steps); the last steps use the evaluation distribution itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from tokbench.synth.vstar import LETTERS, RELATIVE_SHARE, _image_sizes, _square_side, draw_item

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
FINAL_SIZE = 448  # vstar-synth's image size


@dataclass
class CanaryConfig:
    model: str = "tiny-qwen2.5-vl"
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    start_size: int = 224  # px, the images' long side at first; grows to the task's 448
    start_side: int = 64  # px, the squares at first; shrink to the task's 32 (at 448)
    warm: float = 0.65  # fraction of steps at the start size and side
    settle: float = 0.9  # fraction of steps after which items follow the evaluation distribution
    where_share: float = 0.35  # auxiliary "which half of the image holds the <colour> square?" items
    locate_share: float = 0.0  # share of those that are `locate_item`s instead (one square, no colour named)
    relative_share: float = 0.5  # relative-position share of the other items (the evaluation set: 0.4)
    eval_items: int = 64


def question_text(row: dict) -> str:
    """The evaluation prompt's question: lmms-eval's vstar_bench ``doc_to_text`` with the task's post-prompt."""
    from lmms_eval.tasks.vstar_bench.utils import vstar_doc_to_text

    return vstar_doc_to_text(row, {"pre_prompt": "", "post_prompt": POST_PROMPT})


def curriculum(step: int, cfg: CanaryConfig) -> tuple[int, int]:
    """(image size, square side) in px for ``step``: start values until ``warm``, linear to the task's
    (448, 32) at ``settle``, then the task's."""
    progress = min(1.0, max(0.0, (step / cfg.steps - cfg.warm) / (cfg.settle - cfg.warm)))
    size = round((cfg.start_size + (FINAL_SIZE - cfg.start_size) * progress) / 28) * 28
    side = round(cfg.start_side + (_square_side(FINAL_SIZE, FINAL_SIZE) - cfg.start_side) * progress)
    return size, side


def random_item(
    rng: np.random.Generator, size: int = FINAL_SIZE, side: int | None = None, relative_share: float = RELATIVE_SHARE
) -> tuple[dict, Image.Image]:
    """One fresh vstar-synth item (row, image): the task's category mix (``relative_share``) and sizes for
    a ``size`` px long side, squares of ``side`` px (default: the task's for the image)."""
    width, height = (sizes := _image_sizes((size, size)))[int(rng.integers(len(sizes)))]
    relative = rng.random() < relative_share
    square = side or _square_side(width, height)
    if relative:
        square = _relative_side(square, width, height)
    answer = int(rng.integers(2 if relative else len(LETTERS)))
    return draw_item(rng, "relative_position" if relative else "direct_attributes", answer, width, height, square)


def _relative_side(side: int, width: int, height: int) -> int:
    """Two squares 3 sides apart must fit along either axis."""
    return min(side, (min(width, height) - 16) // 4)


def where_item(rng: np.random.Generator, size: int = FINAL_SIZE, side: int | None = None) -> tuple[dict, Image.Image]:
    """A training-only stepping stone to the relative questions: the two-square layout of a
    relative-position item, asked "Is the <colour> square on the left or right side of the image?"
    (or in the upper or lower half) about one of its squares, never one within half a side of the middle.

    It needs one colour word bound to its square and that square's position read out, the two halves of
    a relative question; measured on the canary, the relative questions stay at chance without it.
    """
    width, height = (sizes := _image_sizes((size, size)))[int(rng.integers(len(sizes)))]
    square = _relative_side(side or _square_side(width, height), width, height)
    while True:
        row, image = draw_item(rng, "relative_position", int(rng.integers(2)), width, height, square)
        horizontal = "left" in row["text"]
        axis, which = (0 if horizontal else 1), int(rng.integers(2))
        box, extent = row["bboxes"][which], (width, height)[axis]
        centre = (box[axis] + box[axis + 2]) / 2
        if abs(centre - extent / 2) > square / 2:
            break
    return _which_half(row, f"the {row['colors'][which]} square", horizontal, centre < extent / 2, "where"), image


def _which_half(row: dict, subject: str, horizontal: bool, first_half: bool, category: str) -> dict:
    """``row`` re-asked as "Is <subject> on the left or right side of the image?" (or in the upper or
    lower half); the answer is (A) when the subject lies in the first half."""
    question, words = (
        (f"Is {subject} on the left or right side of the image?", ("left", "right"))
        if horizontal
        else (f"Is {subject} in the upper or lower half of the image?", ("upper", "lower"))
    )
    label = LETTERS[0] if first_half else LETTERS[1]
    return {**row, "text": f"{question}\n(A) {words[0]}\n(B) {words[1]}", "label": label, "category": category}


def locate_item(rng: np.random.Generator, size: int = FINAL_SIZE, side: int | None = None) -> tuple[dict, Image.Image]:
    """A training-only step before `where_item`: one square (a direct-attributes layout), asked "Is the
    square on the left or right side of the image?" (or in the upper or lower half), its centre never
    within 12 px of the middle. It needs a position read out and nothing bound to a colour word; the
    LLaVA canary learns it first (docs/canary.md).
    """
    width, height = (sizes := _image_sizes((size, size)))[int(rng.integers(len(sizes)))]
    horizontal = rng.random() < 0.5
    axis = 0 if horizontal else 1
    while True:
        row, image = draw_item(rng, "direct_attributes", int(rng.integers(len(LETTERS))), width, height, side)
        centre, extent = (row["bbox"][axis] + row["bbox"][axis + 2]) / 2, (width, height)[axis]
        if abs(centre - extent / 2) > 12:
            break
    return _which_half(row, "the square", horizontal, centre < extent / 2, "locate"), image


def training_item(rng: np.random.Generator, cfg: CanaryConfig, size: int, side: int) -> tuple[dict, Image.Image]:
    """One training item: an auxiliary item with probability ``cfg.where_share`` (a `locate_item` with
    probability ``cfg.locate_share``, else a `where_item`), else a vstar-synth item with
    ``cfg.relative_share`` relative-position questions."""
    if rng.random() < cfg.where_share:
        if cfg.locate_share and rng.random() < cfg.locate_share:  # no draw at 0: the Qwen recipes' stream stays
            return locate_item(rng, size, side)
        return where_item(rng, size, side)
    return random_item(rng, size, side, cfg.relative_share)


def draw_batch(
    rng: np.random.Generator, n: int, size: int = FINAL_SIZE, side: int | None = None, cfg: CanaryConfig | None = None
) -> tuple[list, list[str], list[str]]:
    """``n`` fresh items: (images, questions, answer letters); with ``cfg``, `training_item`s, else
    vstar-synth's distribution (`random_item`)."""
    items = [training_item(rng, cfg, size, side) if cfg else random_item(rng, size, side) for _ in range(n)]
    return [image for _, image in items], [question_text(row) for row, _ in items], [row["label"] for row, _ in items]


def _inputs(adapter, images: list, questions: list[str], answers: list[str] | None):
    """Processor inputs (left padded); with ``answers``, the letter + end-of-turn appended and labelled.

    Returns (inputs dict, labels (b, L) or None): only the last two positions carry labels.
    """
    adapter.tokenizer.padding_side = "left"
    eos = adapter.tokenizer.convert_ids_to_tokens(adapter.eos_token_ids[0])
    prompts = [adapter.build_prompt(q) for q in questions]
    if answers is not None:
        prompts = [p + a + eos for p, a in zip(prompts, answers)]
    inputs = adapter.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    if answers is None:
        return inputs, None
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    return inputs, labels


@torch.no_grad()
def answers_correct(adapter, images: list, questions: list[str], answers: list[str]) -> list[bool]:
    """Per item: is the greedy next token after the prompt the right letter?"""
    inputs, _ = _inputs(adapter, images, questions, None)
    logits = adapter.model(**inputs).logits[:, -1]
    predicted = adapter.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return [p == a for p, a in zip(predicted, answers)]


def held_out_accuracy(adapter, cfg: CanaryConfig, size: int = FINAL_SIZE, side: int | None = None) -> dict[str, float]:
    """Accuracy per category on ``cfg.eval_items`` vstar-synth items (the task's mix) at ``size``/``side``,
    drawn from a stream disjoint from the training one; keys ``all`` and each category present."""
    rows, images = zip(*(random_item(np.random.default_rng([cfg.seed, 2, i]), size, side) for i in range(cfg.eval_items)))
    correct = answers_correct(adapter, list(images), [question_text(row) for row in rows], [row["label"] for row in rows])
    result = {"all": float(np.mean(correct))}
    for category in sorted({row["category"] for row in rows}):
        result[category] = float(np.mean([c for c, row in zip(correct, rows) if row["category"] == category]))
    return result


def train(adapter, cfg: CanaryConfig, log: Callable[[str], None] = print) -> dict:
    """Train ``adapter.model`` in place; returns {"loss": [...], "accuracy": held-out per category (task
    distribution), "seconds": ...}."""
    from transformers import get_wsd_schedule

    torch.manual_seed(cfg.seed)
    model = adapter.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    decay = round((1 - cfg.settle) * cfg.steps)
    schedule = get_wsd_schedule(optimizer, min(50, cfg.steps // 10), decay, num_training_steps=cfg.steps)
    rng = np.random.default_rng([cfg.seed, 1])  # the evaluation set uses seed 0 alone: disjoint streams
    losses, start, nan = [], time.time(), float("nan")
    for step in range(cfg.steps):
        size, side = curriculum(step, cfg)
        inputs, labels = _inputs(adapter, *draw_batch(rng, cfg.batch_size, size, side, cfg))
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            model.eval()
            accuracy = held_out_accuracy(adapter, cfg, size, side)  # at the current curriculum stage
            model.train()
            log(f"step {step + 1}/{cfg.steps}  loss {np.mean(losses[-100:]):.3f}  held-out acc {accuracy['all']:.2f} "
                f"(direct {accuracy.get('direct_attributes', nan):.2f}, relative {accuracy.get('relative_position', nan):.2f})  "
                f"images {size}px squares {side}px  {time.time() - start:.0f}s")  # fmt: skip
    model.eval()
    return {"loss": losses, "accuracy": held_out_accuracy(adapter, cfg), "seconds": time.time() - start}


def save_weights(adapter, path: Path) -> Path:
    """The model's state dict as one safetensors file (tied weights stored once)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(adapter.model, str(path))
    return path

