"""Published efficiency protocols as one command: ``tokbench bench --protocol glimpseprune-vstar``.

``glimpseprune-vstar`` is GlimpsePrune's V* efficiency figure (arXiv 2508.01548; REFERENCES.md): `full` and
every method at a fixed ratio of 0.111, batch 4, 3 warm-up batches, ``max_pixels`` 3211264, greedy V*
generation (16 new tokens); per-sample TTFT (model side, tower to first logits, batch time / 4), decoding
time per token, end-to-end time, peak memory (allocator peak, weights included) and KV-cache size.
Offline it runs on ``vstar-synth-hires`` (V*-sized images, ~4096 visual tokens each); with real V* data
pass ``--task vstar --data-dir DIR``. With ``--random-weights`` the real-size architecture is built
with random weights, which leaves every efficiency figure valid and accuracy meaningless. Every setting that differs from the protocol is printed with the protocol's value.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tokbench.runner import RunConfig


@dataclass(frozen=True)
class Protocol:
    """The settings a published efficiency figure fixes."""

    name: str
    source: str
    task: str
    ratio: float
    batch_size: int
    warmup: int
    max_pixels: int
    model: str
    columns: tuple[str, ...] = ()


PROTOCOLS = {
    "glimpseprune-vstar": Protocol(
        name="glimpseprune-vstar",
        source="GlimpsePrune (arXiv 2508.01548), V* efficiency: batch 4, 3 warm-ups, ratio 0.111, max_pixels 3211264",
        task="vstar-synth-hires",
        ratio=0.111,
        batch_size=4,
        warmup=3,
        max_pixels=3211264,
        model="qwen2.5-vl-7b",
        columns=("ttft_ms", "decode_ms_per_token", "e2e_ms", "peak_mem_mb", "kv_cache_mb"),
    )
}
LABELS = {
    "ttft_ms": "TTFT / sample (ms)",
    "decode_ms_per_token": "decode / token / sample (ms)",
    "e2e_ms": "end-to-end / sample (ms)",
    "peak_mem_mb": "peak memory (MB)",
    "kv_cache_mb": "KV cache / sample (MB)",
}


@dataclass
class ProtocolRun:
    protocol: Protocol
    model: str
    random_weights: bool
    methods: list[str]
    task: str
    data_dir: str | None = None
    limit: int | None = None
    max_pixels: int | None = None
    method_args: dict[str, dict[str, str]] = field(default_factory=dict)
    output: str = "results/protocols"

    def config(self, method: str) -> RunConfig:
        p = self.protocol
        args = dict(self.method_args.get(method, {}))
        if method == "glimpseprune" and self.random_weights:
            args.setdefault("allow_untrained", "true")  # the VIP's cost does not depend on its weights' values
        return RunConfig(
            model=self.model, method=method, task=self.task, ratio=None if method == "full" else p.ratio,
            method_args=args, limit=self.limit, batch_size=p.batch_size, warmup=p.warmup,
            max_pixels=self.max_pixels or p.max_pixels, random_weights=self.random_weights,
            data_dir=self.data_dir, output=str(self.directory),
        )  # fmt: skip

    @property
    def directory(self) -> Path:
        weights = "random-weights" if self.random_weights else "weights"
        return Path(self.output) / self.protocol.name / f"{self.model.replace('/', '_')}-{weights}"

    def deviations(self) -> list[str]:
        """Settings that differ from the protocol, each with the protocol's value."""
        p, out = self.protocol, []
        if self.task != p.task:
            out.append(f"task {self.task} (protocol: V*, offline stand-in {p.task})")
        if self.max_pixels and self.max_pixels != p.max_pixels:
            out.append(f"max_pixels {self.max_pixels} (protocol: {p.max_pixels})")
        if self.limit is not None:
            out.append(f"limit {self.limit} documents (protocol: the whole task)")
        if self.random_weights:
            out.append("random weights: accuracy is meaningless; every efficiency figure is valid")
        return out


def default_methods() -> list[str]:
    from tokbench.pruner import method_names

    return ["full", *(m for m in method_names() if m != "full")]


def run_protocol(plan: ProtocolRun, aliases: dict[str, str], echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``plan``; write ``protocol.md``, ``protocol.csv`` and ``protocol.png`` into its
    directory and return ``{"rows": [...], "skipped": {method: reason}, "directory": Path}``. The figures
    are `tokbench.report.aggregate`'s (the one definition every report uses; speedup vs ``full`` included)."""
    from tokbench.pruner import BudgetError, MethodError
    from tokbench.report import aggregate
    from tokbench.runner import RunValidationError, run
    from tokbench.store import load_runs

    run_dirs, skipped = [], {}
    for method in plan.methods:
        try:
            run_dirs.append(run(plan.config(method), aliases).run_dir)
        except (BudgetError, MethodError, RunValidationError) as err:  # e.g. a ratio a shallow model cannot reach
            skipped[method] = str(err)
            echo(f"{method}: skipped ({err})")
            continue
        echo(f"{method}: done ({run_dirs[-1]})")
    columns = ["method", "n", "n_errors", "retention", "accuracy", *plan.protocol.columns, "speedup"]
    rows = aggregate(load_runs(run_dirs))[columns].to_dict("records") if run_dirs else []
    table = write_outputs(plan, rows, skipped)
    echo(table)
    return {"rows": rows, "skipped": skipped, "directory": plan.directory}


def write_outputs(plan: ProtocolRun, rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    """The markdown table (with the settings and deviations), a CSV and a bar plot per figure."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    plan.directory.mkdir(parents=True, exist_ok=True)
    frame.to_csv(plan.directory / "protocol.csv", index=False)
    p = plan.protocol
    lines = [
        f"# {p.name}: {plan.model}{' (random weights)' if plan.random_weights else ''}",
        "",
        f"Protocol: {p.source}. Run: task {plan.task}, ratio {p.ratio}, batch {p.batch_size}, "
        f"{p.warmup} warm-ups, max_pixels {plan.max_pixels or p.max_pixels}.",
        "Times are per sample (batch time / batch size) and model side (vision tower to first logits for TTFT).",
    ]
    lines += [f"Deviation: {d}" for d in plan.deviations()]
    lines += ["", frame.rename(columns=LABELS).to_markdown(index=False, floatfmt=".4g") if not frame.empty else "(no rows)"]
    lines += [f"- {m} skipped: {why}" for m, why in skipped.items()]
    text = "\n".join(lines) + "\n"
    (plan.directory / "protocol.md").write_text(text)
    if not frame.empty:
        _plot(frame, [c for c in p.columns if frame[c].notna().any()], plan.directory / "protocol.png")
    settings = {"protocol": asdict(p), "deviations": plan.deviations(), "skipped": skipped}
    (plan.directory / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return text


def _plot(frame, columns: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], columns):
        ax.barh(frame["method"], frame[column], color="#4c72b0")
        ax.set_title(LABELS.get(column, column), fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
