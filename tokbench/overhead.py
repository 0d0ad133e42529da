"""Engine and method overhead, measured side by side in one run, interleaved, with their spread.

(a) engine overhead: tokbench `full` (``generate``, one new token) / plain Hugging Face
    ``model(**inputs, logits_to_keep=1)`` (last position only, as the engine), both timed around the
    whole call (preprocessing included);
(b) method overhead: each method's TTFT / an *oracle* on the same schedule: it drops exactly the counts
    the method kept, at the same stages and layers (in-LLM methods at the same layer), evenly spaced and
    with zero selection cost (no statistics, no attention rows, no VIP), so the ratio isolates selection;
(c) measured TTFT speedup (full / method) vs the FLOPs bound 1 / ``flops_ratio_total`` (LLM + vision
    tower + selection);
(d) peak memory added by the call / the oracle's (`tokbench.metrics.call_peak_mb`).

Every arm runs once per round, rounds rotate the order (A B C, B C A, ...), and each ratio is taken
within a round, then summarised as median [min-max] over the rounds: a load spike on a shared machine
hits one round's pair, not one arm. Entry points: ``tokbench bench`` and ``python bench/overhead.py``::

    tokbench bench --quick                                 # tiny model, CPU, < 60 s
    tokbench bench --model qwen2.5-vl-7b --random-weights --image 1344x1008 --batch 4 --ratio 0.111
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from tokbench.config import load_config
from tokbench.engine import BatchOutput, Engine
from tokbench.metrics import LLMShape, call_peak_mb
from tokbench.models import load_model
from tokbench.pruner import Budget, GlimpseProbe, KeepDecision, Pruner, Stage, StageSpec, build_method
from tokbench.records import flops_fields

DEFAULT_METHODS = "random,pool,fastv,divprune,visionzip,pyramiddrop,vscan"
QUICK_METHODS = "random,fastv,visionzip"
# the earliest schedules of in-LLM methods, the ones a 4-layer model (the canaries) can reach
SHALLOW_LLM_ARGS = {"fastv": {"k": "1"}, "dart": {"k": "1"}, "pyramiddrop": {"early_layer": "0"}}


@dataclass
class Oracle:
    """The zero-cost twin of a method: the same stages and layers, the same kept counts, evenly spaced.

    counts (dict[str, int]): kept tokens per stage (``str(spec)`` of the method's stage).
    """

    specs: list[StageSpec]
    counts: dict[str, int]
    glimpse_probe: GlimpseProbe | None = None
    budget: Budget | None = None
    name = "oracle"
    version = "bench"

    @classmethod
    def of(cls, method: Pruner, engine: Engine, out: BatchOutput) -> Oracle:
        """The oracle of ``method`` from one of its batches, run with ``record_kept``."""
        specs = [StageSpec(s.stage, layer=s.layer, attention_from="none") for s in engine.specs]
        counts = {str(s): len(out.samples[0].kept_index[str(s)]) for s in engine.specs}
        probe = engine.probe
        if probe is not None:  # the glimpse token rides along; its attention rows are selection work
            probe = GlimpseProbe(probe.token_embed, None, ())
        return cls(specs, counts, probe)

    def stages(self, model) -> list[StageSpec]:
        return self.specs

    def probe(self, model) -> GlimpseProbe | None:
        return self.glimpse_probe

    def stage_count(self, spec, inputs) -> None:
        return None

    def select(self, spec: StageSpec, inputs) -> KeepDecision:
        k = min(self.counts[str(spec)], inputs.n_visual)
        return KeepDecision(torch.linspace(0, inputs.n_visual - 1, k).round().long().unique())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Spread:
    """Median and range of a ratio over rounds."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        return f"{self.median:.3f}x [{min(self.values):.3f}-{max(self.values):.3f}]"


def interleave(arms: dict[str, Callable[[], Any]], warmup: int, rounds: int) -> tuple[dict[str, list], dict[str, list]]:
    """Every arm once per round, the order rotated by one arm each round. Returns the wall milliseconds of
    each arm per round, and what each call returned per round (an engine arm returns its TTFT)."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    returned: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            returned[name].append(arms[name]())
            wall[name].append((time.perf_counter() - start) * 1000)
    return wall, returned


def spread(numerator: list[float], denominator: list[float]) -> Spread:
    """The per-round ratios numerator[r] / denominator[r]."""
    return Spread([a / b for a, b in zip(numerator, denominator)])


def main() -> None:
    """``python bench/overhead.py [options]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--image", default="448x336")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 methods (< 60 s on CPU)")
    measure(**vars(parser.parse_args()))


def measure(
    model: str = "tiny-qwen2.5-vl",
    random_weights: bool = False,
    methods: str = DEFAULT_METHODS,
    ratio: float = 0.4,
    image: str = "448x336",
    batch: int = 1,
    warmup: int = 2,
    repeats: int = 9,
    quick: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Print (a)-(d) for ``model`` on ``batch`` noise images of size ``image`` (WxH); returns the figures.

    (a) compares wall times around the whole call; (b) and (c) the engine's own model-side TTFT
    (tower to first logits, ``BatchOutput.timings_ms["ttft"]``), the span the FLOPs bound covers.
    """
    if quick:
        methods, warmup, repeats = QUICK_METHODS, 1, 15
    adapter = load_model(model, load_config().models, random_weights=random_weights)
    device = adapter.device
    width, height = map(int, image.split("x"))
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))] for _ in range(batch)]
    questions = ["What is the colour of the small square?"] * batch
    doc_ids = list(range(batch))
    shape = LLMShape.from_config(adapter.text_config)

    def plain_hf():
        with torch.no_grad():
            inputs = adapter.preprocess(images, questions)
            adapter.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, logits_to_keep=1,
                          **inputs.model_inputs)  # fmt: skip
            _sync(device)

    def generate(engine: Engine) -> Callable[[], float]:
        def step() -> float:
            out = engine.generate(images, questions, doc_ids, max_new_tokens=1)
            _sync(device)
            return out.timings_ms["ttft"]

        return step

    full = Engine(adapter, build_method("full", None))
    arms: dict[str, Callable[[], Any]] = {"plain": plain_hf, "full": generate(full)}
    built, skipped = {}, {}
    for name in methods.split(","):
        extra = SHALLOW_LLM_ARGS.get(name, {}) if adapter.n_layers <= 4 else {}
        try:
            method = build_method(name, Budget.ratio(ratio), extra)
            engine = Engine(adapter, method, record_kept=True)
            if any(s.stage == Stage.INPUT for s in engine.specs):
                raise ValueError("an input-stage method changes the image itself; no same-schedule oracle")
            out = engine.generate(images, questions, doc_ids, max_new_tokens=1)
        except (ValueError, RuntimeError) as err:
            skipped[name] = str(err)
            continue
        engine.record_kept = False
        oracle = Engine(adapter, Oracle.of(method, engine, out))
        built[name] = (engine, oracle, out)
        arms[name] = generate(engine)
        arms[f"{name}/oracle"] = generate(oracle)
    wall, ttft = interleave(arms, warmup, repeats)

    echo(f"device: {device}  model: {model}{' (random weights)' if random_weights else ''}  image {image} x{batch}  "
         f"{repeats} interleaved rounds after {warmup} warm-up; ratios: median [min-max] over rounds")  # fmt: skip
    overhead = spread(wall["full"], wall["plain"])
    echo(f"(a) engine overhead: full / plain HF (logits_to_keep=1) = {overhead}  "
         f"(medians {statistics.median(wall['full']):.1f} / {statistics.median(wall['plain']):.1f} ms)")  # fmt: skip
    echo(f"{'method':<12} {'ttft/oracle':>24} {'speedup':>8} {'bound':>7} {'mem/oracle':>10}")
    results: dict[str, Any] = {"engine_overhead": overhead, "methods": {}, "skipped": skipped}
    for name, (engine, oracle, out) in built.items():
        bound = 1 / statistics.mean(flops_fields(sample, shape)["flops_ratio_total"] for sample in out.samples)
        over = spread(ttft[name], ttft[f"{name}/oracle"])
        speedup = spread(ttft["full"], ttft[name])
        memory = call_peak_mb(device, arms[name]) / max(call_peak_mb(device, arms[f"{name}/oracle"]), 1e-9)
        results["methods"][name] = {"overhead": over, "speedup": speedup, "bound": bound, "memory": memory}
        echo(f"{name:<12} {str(over):>24} {speedup.median:>7.2f}x {bound:>6.2f}x {memory:>9.3f}x")
    for name, why in skipped.items():
        echo(f"{name:<12} skipped: {why}")
    return results


if __name__ == "__main__":
    main()
