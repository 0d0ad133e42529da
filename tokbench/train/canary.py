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
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    start_size: int = 224  # px, the images' long side at first; grows to the task's 448
    start_side: int = 64  # px, the squares at first; shrink to the task's 32 (at 448)
    warm: float = 0.25  # fraction of steps at the start size and side
    settle: float = 0.8  # fraction of steps after which items follow the evaluation distribution
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


def random_item(rng: np.random.Generator, size: int = FINAL_SIZE, side: int | None = None) -> tuple[dict, Image.Image]:
    """One fresh vstar-synth item (row, image): the task's category mix and sizes for a ``size`` px long
    side, squares of ``side`` px (default: the task's for the image)."""
    width, height = (sizes := _image_sizes((size, size)))[int(rng.integers(len(sizes)))]
    relative = rng.random() < RELATIVE_SHARE
    square = side or _square_side(width, height)
    if relative:  # two squares 3 sides apart must fit along either axis
        square = min(square, (min(width, height) - 16) // 4)
    answer = int(rng.integers(2 if relative else len(LETTERS)))
    return draw_item(rng, "relative_position" if relative else "direct_attributes", answer, width, height, square)


def draw_batch(rng: np.random.Generator, n: int, size: int = FINAL_SIZE, side: int | None = None) -> tuple[list, list[str], list[str]]:
    """``n`` fresh items (`random_item`): (images, questions, answer letters)."""
    items = [random_item(rng, size, side) for _ in range(n)]
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
def answer_accuracy(adapter, images: list, questions: list[str], answers: list[str]) -> float:
    """Share of items whose greedy next token after the prompt is the right letter."""
    inputs, _ = _inputs(adapter, images, questions, None)
    logits = adapter.model(**inputs).logits[:, -1]
    predicted = adapter.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return float(np.mean([p == a for p, a in zip(predicted, answers)]))


def train(adapter, cfg: CanaryConfig, log: Callable[[str], None] = print) -> dict:
    """Train ``adapter.model`` in place; returns {"loss": [...], "accuracy": held-out, "seconds": ...}."""
    from transformers import get_wsd_schedule

    torch.manual_seed(cfg.seed)
    model = adapter.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    decay = round((1 - cfg.settle) * cfg.steps)
    schedule = get_wsd_schedule(optimizer, min(50, cfg.steps // 10), decay, num_training_steps=cfg.steps)
    rng = np.random.default_rng([cfg.seed, 1])  # the evaluation set uses seed 0 alone: disjoint streams
    held_out = draw_batch(np.random.default_rng([cfg.seed, 2]), cfg.eval_items)
    losses, start = [], time.time()
    for step in range(cfg.steps):
        size, side = curriculum(step, cfg)
        inputs, labels = _inputs(adapter, *draw_batch(rng, cfg.batch_size, size, side))
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            model.eval()
            accuracy = answer_accuracy(adapter, *held_out)
            model.train()
            log(f"step {step + 1}/{cfg.steps}  loss {np.mean(losses[-50:]):.3f}  held-out acc {accuracy:.2f}  "
                f"images {size}px squares {side}px  {time.time() - start:.0f}s")  # fmt: skip
    model.eval()
    return {"loss": losses, "accuracy": answer_accuracy(adapter, *held_out), "seconds": time.time() - start}


def save_weights(adapter, path: Path) -> Path:
    """The model's state dict as one safetensors file (tied weights stored once)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(adapter.model, str(path))
    return path

