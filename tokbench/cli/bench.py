"""`tokbench bench`: engine and method overhead, speedup vs the FLOPs bound, memory (ratios, no task).

Exit codes: 0 success; 2 bad usage.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tokbench.cli import common as c


def bench(
    model: Annotated[str, typer.Option(help="Model alias, hub id or path.")] = "tiny-qwen2.5-vl",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Real architecture, random weights.")] = False,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "random,pool,fastv,divprune,visionzip,pyramiddrop,vscan",
    ratio: Annotated[float, typer.Option(help="Retention for every method.")] = 0.4,
    image: Annotated[str, typer.Option(help="Image size WxH (noise images).")] = "448x336",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", "--batch", help="Images per batch.")] = 1,
    warmup: Annotated[int, typer.Option(help="Untimed iterations first (>= 0).")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed iterations (median, >= 1).")] = 5,
    quick: Annotated[bool, typer.Option("--quick", help="3 methods, few repeats (< 60 s on a 2-core CPU).")] = False,
) -> None:
    """Engine overhead vs plain HF, method TTFT vs an oracle drop, speedup vs FLOPs bound, memory (ratios).

    \b
    Example:
      tokbench bench --model qwen2.5-vl-7b --random-weights --image 1344x1008 --batch-size 4 --ratio 0.111
    """
    for flag, value, least in (("--batch-size", batch_size, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if value < least:
            c.fail(f"{flag} {value} must be >= {least}", 2)
    from tokbench.overhead import measure

    measure(model, random_weights, methods, ratio, image, batch_size, warmup, repeats, quick)


def register(app: typer.Typer) -> None:
    app.command()(bench)
