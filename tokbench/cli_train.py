"""`tokbench train-canary`: train a tiny canary VLM from its random init (docs/canary.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokbench.cli import _fail, out


def train_canary(
    model: Annotated[str, typer.Option(help="tiny-qwen2.5-vl or tiny-llava.")] = "tiny-qwen2.5-vl",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 800,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Fresh items per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of the data stream and the optimizer.")] = 0,
    start_side: Annotated[int, typer.Option(help="Curriculum: square side (px on 448) at step 0.")] = 96,
    out_path: Annotated[
        Optional[Path], typer.Option("--out", help="safetensors file (default: the shipped canary asset).")
    ] = None,
) -> None:
    """Train a tiny model from scratch on CPU until the held-out vstar-synth accuracy is high.

    Example: tokbench train-canary --model tiny-qwen2.5-vl --steps 800 --seed 0
    """
    import torch

    from tokbench.config import load_config
    from tokbench.models import load_model
    from tokbench.models.tiny import ASSETS, TINY_MODELS
    from tokbench.train.canary import CanaryConfig, save_weights, train

    if model not in TINY_MODELS:
        _fail(ValueError(f"train-canary trains {' or '.join(TINY_MODELS)}, not {model!r}"), 2)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    adapter = load_model(f"{model}-random", load_config().models, dtype="float32", device="cpu")
    cfg = CanaryConfig(model=model, steps=steps, batch_size=batch_size, lr=lr, seed=seed, start_side=start_side)
    result = train(adapter, cfg, log=out.print)
    path = save_weights(adapter, out_path or ASSETS / f"{model}.safetensors")
    out.print(f"held-out accuracy {result['accuracy']:.3f} after {steps} steps ({result['seconds']:.0f} s); wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("train-canary")(train_canary)
