"""Train the tiny canary VLMs from scratch on CPU: vstar-synth questions whose answer is a few tokens.

The canary makes the offline default meaningful: full tokens answer well, pruning the target square's
tokens answers at chance, so a method that keeps the wrong tokens visibly loses accuracy.

Recipe (measured on a 2-core CPU, see docs/canary.md): the tiny architecture of ``tokbench.models.tiny``
from its seeded random init; batches of freshly drawn vstar-synth items (both categories, the evaluation
set's category mix and image sizes, seeds disjoint from it); the exact evaluation prompt (lmms-eval's
vstar_bench ``doc_to_text`` with the task's post-prompt, the adapter's chat template); loss on the answer
letter and the end-of-turn token only; AdamW with a one-cycle schedule; a curriculum that shrinks the
squares from ``start_side`` to the task's size over the first 70% of steps (REFERENCES: a small square
from the start never leaves chance level).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tokbench.synth.vstar import LETTERS, RELATIVE_SHARE, _image_sizes, _square_side, draw_item

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class CanaryConfig:
    model: str = "tiny-qwen2.5-vl"
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    start_side: int = 96  # px on a 448 image; shrinks to the task's 32 px
    curriculum: float = 0.7  # fraction of steps spent shrinking
    eval_items: int = 64


def _question(row: dict) -> str:
    from lmms_eval.tasks.vstar_bench.utils import vstar_doc_to_text

    return vstar_doc_to_text(row, {"pre_prompt": "", "post_prompt": POST_PROMPT})


def _side(step: int, cfg: CanaryConfig, width: int, height: int) -> int:
    """Square side for ``step``: linear from ``start_side`` (scaled to the image) down to the task's."""
    final = _square_side(width, height)
    start = max(final, round(cfg.start_side * max(width, height) / 448))
    progress = min(1.0, step / max(1, cfg.curriculum * cfg.steps))
    return round(start + (final - start) * progress)


def draw_batch(rng: np.random.Generator, n: int, side_at: Callable[[int, int], int]) -> tuple[list, list[str], list[str]]:
    """``n`` fresh items: (images, questions, answer letters); ``side_at(width, height)`` sets the squares."""
    sizes = _image_sizes((448, 448))
    images, questions, answers = [], [], []
    for _ in range(n):
        width, height = sizes[int(rng.integers(len(sizes)))]
        relative = rng.random() < RELATIVE_SHARE
        side = side_at(width, height)
        if relative:  # two squares 3 sides apart must fit along either axis
            side = min(side, (min(width, height) - 16) // 4)
        answer = int(rng.integers(2 if relative else 4))
        row, image = draw_item(rng, "relative_position" if relative else "direct_attributes", answer, width, height, side)
        images.append(image)
        questions.append(_question(row))
        answers.append(LETTERS[answer])
    return images, questions, answers


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
    torch.manual_seed(cfg.seed)
    model = adapter.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = np.random.default_rng([cfg.seed, 1])  # the evaluation set uses seed 0 alone: disjoint streams
    held_out = draw_batch(np.random.default_rng([cfg.seed, 2]), cfg.eval_items, _square_side)
    losses, start = [], time.time()
    for step in range(cfg.steps):
        images, questions, answers = draw_batch(rng, cfg.batch_size, lambda w, h: _side(step, cfg, w, h))
        inputs, labels = _inputs(adapter, images, questions, answers)
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
            recent = float(np.mean(losses[-50:]))
            log(f"step {step + 1}/{cfg.steps}  loss {recent:.3f}  held-out acc {accuracy:.2f}  "
                f"side {_side(step, cfg, 448, 448)}px  {time.time() - start:.0f}s")  # fmt: skip
    model.eval()
    return {"loss": losses, "accuracy": answer_accuracy(adapter, *held_out), "seconds": time.time() - start}


def save_weights(adapter, path: Path) -> Path:
    """The model's state dict as one safetensors file (tied weights stored once)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(adapter.model, str(path))
    return path

