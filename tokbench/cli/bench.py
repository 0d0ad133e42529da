"""`tokbench bench`: engine and method overhead, speedup vs the FLOPs bound, memory growth, and the
published efficiency protocols (docs/performance.md).

Exit codes: 0 success; 2 bad usage; 3 a protocol run had failing samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokbench.cli import common as c


def bench(
    model: Annotated[Optional[str], typer.Option(help="Model alias, hub id or path (default: tiny-qwen2.5-vl; "
                                                 "--memory: a narrow deep-tower Qwen2.5-VL; --protocol: its model).")] = None,  # fmt: skip
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Real architecture, random weights.")] = False,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (--protocol: every method).")] = None,
    ratio: Annotated[float, typer.Option(help="Retention for every method.")] = 0.4,
    image: Annotated[str, typer.Option(help="Image size WxH (noise images).")] = "448x336",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", "--batch", help="Images per batch.")] = 1,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first (>= 0).")] = 2,
    repeats: Annotated[int, typer.Option(help="Interleaved timed rounds (>= 1).")] = 9,
    quick: Annotated[bool, typer.Option("--quick", help="3 methods, 15 rounds (< 60 s on a 2-core CPU).")] = False,
    memory: Annotated[bool, typer.Option("--memory", help="Peak memory per visual-token count, every vision-stage "
                                                       "and in-LLM method.")] = False,  # fmt: skip
    tokens: Annotated[str, typer.Option(help="--memory: visual-token counts (comma list).")] = "1024,4096,16384",
    protocol: Annotated[Optional[str], typer.Option(help="Run a published efficiency protocol: glimpseprune-vstar.")] = None,
    task: Annotated[Optional[str], typer.Option(help="--protocol: task (default: the protocol's offline workload).")] = None,
    data_dir: c.DataDirOpt = None,
    limit: c.LimitOpt = None,
    max_pixels: c.MaxPixelsOpt = None,
    method_arg: c.MethodArgOpt = [],  # noqa: B006 - typer needs a list default
    output: c.RunOutputOpt = None,
) -> None:
    """Engine overhead vs plain HF, method TTFT vs a same-schedule oracle, speedup vs the FLOPs bound,
    memory (ratios, interleaved rounds, median [min-max]); --memory: memory growth with the token count;
    --protocol: a published efficiency figure as a table and plot.

    \b
    Examples:
      tokbench bench --quick
      tokbench bench --model qwen2.5-vl-7b --random-weights --image 1344x1008 --batch-size 4 --ratio 0.111
      tokbench bench --memory --tokens 1024,2048,4096
      tokbench bench --protocol glimpseprune-vstar --model qwen2.5-vl-7b --random-weights
    """
    for flag, value, least in (("--batch-size", batch_size, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if value < least:
            c.fail(f"{flag} {value} must be >= {least}", 2)
    if memory and protocol:
        c.fail("pass either --memory or --protocol, not both", 2)
    if protocol:
        _protocol(protocol, model, random_weights, methods, task, data_dir, limit, max_pixels, method_arg, output)
    elif memory:
        counts = c.numbers(tokens, int, "--tokens")
        if not counts or min(counts) < 16:
            c.fail(f"--tokens {tokens!r}: use a comma list of visual-token counts >= 16, e.g. 1024,4096", 2)
        from tokbench.memory_scaling import run

        try:
            run(model, sorted(counts), random_weights, echo=c.out().print)
        except (*c.usage_errors(), ValueError) as err:  # an unknown model, no shipped config for --random-weights
            c.fail(err, 2)
    else:
        from tokbench.overhead import DEFAULT_METHODS, measure

        measure(model or "tiny-qwen2.5-vl", random_weights, methods or DEFAULT_METHODS, ratio, image, batch_size,
                warmup, repeats, quick, echo=c.out().print)  # fmt: skip


def _protocol(name, model, random_weights, methods, task, data_dir, limit, max_pixels, method_arg, output) -> None:
    from tokbench.config import load_config
    from tokbench.protocol import PROTOCOLS, ProtocolRun, default_methods, run_protocol
    from tokbench.pruner import method_names

    if name not in PROTOCOLS:
        c.fail(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}", 2)
    if limit is not None and limit < 1:
        c.fail(f"--limit {limit} must be >= 1", 2)
    chosen = c.split(methods) if methods else default_methods()
    unknown = sorted(set(chosen) - set(method_names()))
    if unknown:
        c.fail(f"unknown method(s) {', '.join(unknown)}; see tokbench list methods", 2)
    spec = PROTOCOLS[name]
    config = load_config()
    scoped = c.method_args(method_arg, chosen)
    args = {m: {**scoped.get("", {}), **scoped.get(m, {})} for m in chosen}
    plan = ProtocolRun(
        protocol=spec, model=model or spec.model, random_weights=random_weights, methods=chosen,
        task=task or spec.task, data_dir=data_dir, limit=limit, max_pixels=max_pixels,
        method_args=args, output=str(output or Path(config.defaults.get("output", "results")) / "protocols"),
    )  # fmt: skip
    c.writable_dir(plan.directory)
    try:
        result = run_protocol(plan, config.models, echo=c.out().print)
    except c.usage_errors() as err:
        c.fail(err, 2)
    c.out().print(f"table: {result['directory'] / 'protocol.md'}")
    if any(row.get("n_errors") for row in result["rows"]):
        c.note("some samples failed; see the 'error' field of their rows")
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    app.command()(bench)
