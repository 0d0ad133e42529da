"""`tokbench train-canary | train-glimpse`: train the tiny canary VLM (docs/canary.md) and GlimpsePrune's
glimpse token + VIP (docs/methods/glimpseprune.md). Exit codes: 0 success; 2 bad usage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokbench.cli import common as c


def train_canary(
    model: Annotated[str, typer.Option(help="tiny-qwen2.5-vl or tiny-llava.")] = "tiny-qwen2.5-vl",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 3000,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Fresh items per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, stable, cosine decay).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the data stream and the optimizer.")] = 0,
    start_size: Annotated[int, typer.Option(help="Curriculum: image long side (px) at first; grows to 448.")] = 224,
    start_side: Annotated[int, typer.Option(help="Curriculum: square side (px) at first; shrinks to 32.")] = 64,
    warm: Annotated[float, typer.Option(help="Curriculum: share of the steps at the start size and side.")] = 0.65,
    settle: Annotated[float, typer.Option(help="Curriculum: share of the steps after which items follow the task (> --warm).")] = 0.9,
    where_share: Annotated[float, typer.Option(help="Share of auxiliary items (\"is the <colour> square on the left or right?\").")] = 0.35,
    locate_share: Annotated[float, typer.Option(help="Share of the auxiliary items that ask about one square, no colour named.")] = 0.0,
    init: Annotated[
        Optional[Path], typer.Option("--init", help="Continue from these weights (safetensors) instead of the random init.")
    ] = None,
    output: Annotated[Optional[Path], c.output_option("safetensors file (default: the shipped canary asset).")] = None,
) -> None:
    """Train a tiny model from scratch on CPU until the held-out vstar-synth accuracy is high.

    \b
    Examples:
      tokbench train-canary --model tiny-qwen2.5-vl --steps 3000 --seed 0   # the shipped canary (docs/canary.md)
      tokbench train-canary --init canary.safetensors --start-size 448 --start-side 32 --lr 5e-4 --output more.safetensors
      tokbench train-canary --model tiny-llava --steps 600 --where-share 1 --locate-share 1 --warm 0.99 --settle 1 --output locate.safetensors
    """
    import torch

    from tokbench.config import load_config
    from tokbench.models import load_model
    from tokbench.models.tiny import ASSETS, tiny_families
    from tokbench.train.canary import CanaryConfig, save_weights, train

    if model not in tiny_families():
        c.fail(f"train-canary trains {', '.join(sorted(tiny_families()))}, not {model!r}", 2)
    if not 0 <= warm < settle <= 1:
        c.fail(f"need 0 <= --warm < --settle <= 1, got --warm {warm} --settle {settle}", 2)
    for flag, share in (("--where-share", where_share), ("--locate-share", locate_share)):
        if not 0 <= share <= 1:
            c.fail(f"{flag} is a share in [0, 1], got {share}", 2)
    if output is not None:
        c.writable_dir(output.parent)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    adapter = load_model(f"{model}-random", load_config().models, dtype="float32", device="cpu")
    if init is not None:
        from safetensors.torch import load_model as load_weights

        load_weights(adapter.model, str(init))
    cfg = CanaryConfig(model=model, steps=steps, batch_size=batch_size, lr=lr, seed=seed, start_size=start_size,
                       start_side=start_side, warm=warm, settle=settle, where_share=where_share, locate_share=locate_share)  # fmt: skip
    result = train(adapter, cfg, log=c.out().print)
    path = save_weights(adapter, output or ASSETS / f"{model}.safetensors")
    acc, nan = result["accuracy"], float("nan")
    c.out().print(f"held-out accuracy {acc['all']:.3f} (direct {acc.get('direct_attributes', nan):.3f}, relative "
              f"{acc.get('relative_position', nan):.3f}) after {steps} steps ({result['seconds']:.0f} s); wrote {path}")  # fmt: skip


def train_glimpse(
    model: Annotated[str, typer.Option(help="Model alias, hub id or local path (its weights stay frozen).")] = "tiny-qwen2.5-vl",
    data: Annotated[str, typer.Option(help="vstar-synth (generated, with boxes) or a Visual-CoT training .jsonl.")] = "vstar-synth",
    image_dir: Annotated[Optional[Path], typer.Option("--image-dir", help="Images of a .jsonl (DIR/cot/<dataset>/<image>).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps (official: 2500 = 20K samples / 8).")] = 2500,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per step (official: 1 x 8 accumulation).")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (official 1e-4; cosine, 10% warm-up).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of the init, the data order and the optimizer.")] = 0,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto | float32 | bfloat16 | float16.")] = "auto",
    output: Annotated[
        Optional[Path], c.output_option("Directory for config.json + new_modules_gp.pt (default: shipped asset for tiny models).")
    ] = None,
) -> None:
    """Train GlimpsePrune's glimpse token + VIP on a frozen model (Dice + 0.1 BCE on the boxes' token mask).

    Writes the official checkpoint layout, loaded by --method glimpseprune --method-arg weights=DIR.

    \b
    Example (the shipped canary VIP):
      tokbench train-glimpse --model tiny-qwen2.5-vl --steps 300 --batch-size 8 --lr 3e-4
    """
    import torch

    from tokbench.config import load_config
    from tokbench.models import load_model
    from tokbench.models.tiny import glimpse_weights_dir, tiny_families
    from tokbench.train.glimpse import GlimpseTrainConfig, GlimpseTrainer

    if output is None and model not in tiny_families():
        c.fail("pass --output DIR for the trained glimpse weights", 2)
    if output is not None:
        c.writable_dir(output)
    cfg = GlimpseTrainConfig(data=data, image_dir=str(image_dir) if image_dir else None, steps=steps,
                             batch_size=batch_size, lr=lr, seed=seed)  # fmt: skip
    try:
        adapter = load_model(model, load_config().models, dtype=dtype)
        if adapter.device.type == "cpu":
            torch.set_num_threads(min(torch.get_num_threads(), 2))
        trainer = GlimpseTrainer(adapter, cfg)
        result = trainer.train(log=c.out().print)
    except ValueError as err:
        c.fail(err, 2)
    path = trainer.save(output or glimpse_weights_dir(model))
    c.out().print(f"held-out: kept {result['kept']:.3f} of tokens, box recall {result['recall']:.2f}, "
              f"loss {result['loss']:.3f} ({result['seconds']:.0f} s); wrote {path}")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("train-canary")(train_canary)
    app.command("train-glimpse")(train_glimpse)
