"""One builder of ``RunConfig`` from command-line values and tokbench.toml, for `run` and `sweep`.

Precedence: an option given on the command line, then ``--efficiency``'s protocol (run only), then
tokbench.toml's ``[defaults]``, then RunConfig's own default. Numbers the runner cannot use are refused
here, before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokbench.cli.common import OptionError
from tokbench.config import Config

# Methods that choose their own number of tokens when given no --ratio / --budget (GlimpsePrune:
# its dynamic default); any other method then keeps every visual token, which a note says.
DECIDES_WITHOUT_BUDGET = ("full", "glimpseprune")
EFFICIENCY = {"batch_size": 4, "warmup": 3, "ratio": 0.111, "max_pixels": 3211264}  # GlimpsePrune's V* protocol


@dataclass
class RunOptions:
    """The run settings as typed on the command line (None: not given)."""

    model: str
    task: str
    method: str = "full"
    ratio: float | None = None
    budget: int | None = None
    method_args: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    batch_size: int | None = None
    warmup: int | None = None
    seed: int | None = None
    dtype: str | None = None
    attn: str | None = None
    max_new_tokens: int | None = None
    position_policy: str | None = None
    data_dir: str | None = None
    random_weights: bool = False
    max_pixels: int | None = None
    device_map: str | None = None
    save_masks: bool = False
    output: Path | None = None
    efficiency: bool = False
    judge: str | None = None
    judge_model: str | None = None
    judge_key_env: str | None = None
    judge_concurrency: int | None = None
    judge_timeout: float | None = None


def _check_numbers(o: RunOptions) -> None:
    for flag, value, least in (("--max-new-tokens", o.max_new_tokens, 1), ("--max-pixels", o.max_pixels, 1),
                               ("--warmup", o.warmup, 0)):  # fmt: skip
        if value is not None and value < least:
            raise OptionError(f"{flag} {value} must be >= {least}")


def build_run_config(options: RunOptions, config: Config):
    """The ``RunConfig`` these options describe; the judge from ``--judge*``, then tokbench.toml's [judge]."""
    from tokbench.judge import JudgeConfig
    from tokbench.runner import RunConfig

    o = options
    _check_numbers(o)
    d: dict[str, Any] = dict(config.defaults)
    ratio, max_pixels = o.ratio, o.max_pixels
    if o.efficiency:
        d.update(batch_size=EFFICIENCY["batch_size"], warmup=EFFICIENCY["warmup"])
        if ratio is None and o.budget is None:
            ratio = EFFICIENCY["ratio"]
        max_pixels = max_pixels or EFFICIENCY["max_pixels"]

    def pick(value: Any, key: str, fallback: Any) -> Any:
        return value if value is not None else d.get(key, fallback)

    run_config = RunConfig(
        model=o.model,
        method=o.method,
        task=o.task,
        ratio=ratio,
        budget=o.budget,
        method_args=dict(o.method_args),
        limit=o.limit,
        batch_size=pick(o.batch_size, "batch_size", 1),
        warmup=pick(o.warmup, "warmup", 0),
        seed=pick(o.seed, "seed", 0),
        dtype=pick(o.dtype, "dtype", "auto"),
        attn_implementation=pick(o.attn, "attn_implementation", "auto"),
        max_new_tokens=o.max_new_tokens,
        position_policy=o.position_policy,
        data_dir=o.data_dir,
        random_weights=o.random_weights,
        max_pixels=max_pixels,
        device_map=o.device_map,
        save_masks=o.save_masks,
        judge=JudgeConfig.from_table(config.judge, judge=o.judge, model=o.judge_model, key_env=o.judge_key_env,
                                     concurrency=o.judge_concurrency, timeout=o.judge_timeout),  # fmt: skip
        output=str(o.output if o.output is not None else d.get("output", "results")),
    )
    if run_config.warmup < 0:  # from tokbench.toml
        raise OptionError(f"warmup {run_config.warmup} (tokbench.toml [defaults]) must be >= 0")
    return run_config


def check_model(options: RunOptions, config: Config) -> None:
    """Resolve ``--model`` (unknown alias, missing path) and, with ``--random-weights``, find its shipped
    architecture config; raises the library's one-line errors."""
    from tokbench.models import resolve_model
    from tokbench.runner import RunValidationError

    target = resolve_model(options.model, config.models)
    if options.random_weights:
        from tokbench.models.random_weights import config_name

        try:
            config_name(options.model, target)
        except ValueError as err:
            raise RunValidationError(str(err)) from None


def unpruned_note(method: str, ratio: float | None, budget: int | None, method_args: dict[str, str]) -> str | None:
    """The one line that says a pruning method was given no budget (None when it needs no saying)."""
    if ratio is not None or budget is not None or method in DECIDES_WITHOUT_BUDGET:
        return None
    unless = " unless its --method-arg options prune" if method_args else ""
    return (f"note: no --ratio or --budget: {method} keeps every visual token{unless} (ratio 1); "
            "pass e.g. --ratio 0.25 or --budget 64")  # fmt: skip
