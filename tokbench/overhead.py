"""Engine and method overhead, measured side by side in one run (ratios, never absolute targets).

(a) engine overhead: plain HF ``model(**inputs)`` prefill + first token vs tokbench `full`;
(b) method overhead: each method's TTFT vs an *oracle drop* feeding exactly the same number of tokens
    with zero selection cost (a precomputed keep set);
(c) measured TTFT speedup vs the analytic LLM-prefill FLOPs bound;
(d) peak memory vs the oracle.
Median of ``repeats`` after ``warmup`` iterations. Entry points: ``python bench/overhead.py`` and
``tokbench bench`` (same options)::

    tokbench bench --quick                                 # tiny model, CPU, < 60 s
    tokbench bench --model qwen2.5-vl-7b --random-weights --image 1344x1008 --batch 4 --ratio 0.111
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tokbench.config import load_config
from tokbench.engine import Engine
from tokbench.metrics import LLMShape, PeakMemory, prefill_flops
from tokbench.models import load_model
from tokbench.pruner import Budget, KeepDecision, Stage, StageSpec, build_method


@dataclass
class Oracle:
    """Keeps a fixed, evenly spaced set of ``k`` tokens before the LLM: the same count, no selection cost."""

    budget: Budget
    k: int
    version = "bench"
    name = "oracle"

    def stages(self, model):
        return [StageSpec(Stage.EMBED)]

    def stage_count(self, spec, inputs):
        return None

    def select(self, spec, inputs):
        return KeepDecision(torch.linspace(0, inputs.n_visual - 1, self.k).round().long().unique())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


DEFAULT_METHODS = "random,pool,fastv,divprune,visionzip,pyramiddrop,vscan"


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 methods, few repeats (< 60 s on CPU)")
    measure(**vars(parser.parse_args()))


def measure(
    model: str = "tiny-qwen2.5-vl",
    random_weights: bool = False,
    methods: str = DEFAULT_METHODS,
    ratio: float = 0.4,
    image: str = "448x336",
    batch: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    quick: bool = False,
) -> None:
    """Print the (a)-(d) ratios for ``model`` on ``batch`` noise images of size ``image`` (WxH)."""
    if quick:
        methods, warmup, repeats = "random,fastv,visionzip", 1, 3
    adapter = load_model(model, load_config().models, random_weights=random_weights)
    device = adapter.device
    width, height = map(int, image.split("x"))
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))] for _ in range(batch)]
    questions = ["What is the colour of the small square?"] * batch
    doc_ids = list(range(batch))
    shape = LLMShape.from_config(adapter.text_config)

    def hf_first_token():
        with torch.no_grad():
            inputs = adapter.preprocess(images, questions)
            adapter.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **inputs.model_inputs)
            _sync(device)

    def engine_ttft(method):
        engine = Engine(adapter, method)
        state = {}

        def step():
            state["out"] = engine.generate(images, questions, doc_ids, max_new_tokens=1)
            _sync(device)

        ms = _median_ms(step, warmup, repeats)
        with PeakMemory(device) as memory:
            step()
        return ms, state["out"], memory.peak_mb

    plain = _median_ms(hf_first_token, warmup, repeats)
    full_ms, full_out, full_mem = engine_ttft(build_method("full", Budget.full()))
    print(f"device: {device}  model: {model}{' (random weights)' if random_weights else ''}  "
          f"image {image} x{batch}")
    print(f"(a) engine overhead: full {full_ms:.1f} ms / plain HF {plain:.1f} ms = {full_ms / plain:.3f}x")
    print(f"{'method':<12} {'ttft/oracle':>11} {'speedup':>8} {'flops bound':>11} {'mem/oracle':>10}")
    for name in methods.split(","):
        extra = {"k": "1"} if adapter.n_layers <= 4 and name == "fastv" else {}  # k=2 of 4 layers: avg >= 0.5
        try:
            method = build_method(name, Budget.ratio(ratio), extra)
            ms, out, mem = engine_ttft(method)
        except ValueError as err:
            print(f"{name:<12} skipped: {err}")
            continue
        # same image size in every sample, so one count; in-LLM methods are matched on their layer average
        kept = round(statistics.mean(statistics.mean(s.kept_per_layer) for s in out.samples))
        oracle_ms, _, oracle_mem = engine_ttft(Oracle(Budget.full(), kept))
        full_flops = sum(prefill_flops(shape, s.seq_len_per_layer) for s in full_out.samples)
        flops = sum(prefill_flops(shape, s.seq_len_per_layer) for s in out.samples)
        print(f"{name:<12} {ms / oracle_ms:>10.3f}x {full_ms / ms:>7.2f}x {full_flops / flops:>10.2f}x "
              f"{mem / max(oracle_mem, 1e-9):>9.3f}x")


if __name__ == "__main__":
    main()
