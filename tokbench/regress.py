"""Regression check of finished runs against a checked-in baseline (``results/baselines/*.json``).

Baseline format (``write_baseline`` makes it from runs; one entry per (model, method, budget, task))::

    {
      "tokbench_baseline": 1,
      "created_at": "2025-01-01T00:00:00+00:00",
      "git_sha": "5efeb1a...",
      "sources": ["results/ci"],
      "entries": [
        {"model": "tiny-qwen2.5-vl", "method": "random", "budget": "r0.25", "task": "vstar-synth",
         "n": 8, "device": "NVIDIA H100 80GB HBM3", "peak_mem_source": "cuda_allocator",
         "ttft_basis": "per sample, batch/b", "settings": "",
         "metrics": {"accuracy": 0.375, "accuracy_ci_halfwidth": 0.375, "retention": 0.25,
                     "flops_ratio_llm": 0.31, "flops_ratio_total": 0.35, "ttft_ms": 21.4,
                     "ttft_p90_ms": 23.0, "speedup": 1.8, "peak_mem_mb": 611.0}}

Every figure is ``tokbench.report.aggregate``'s (so ``tokbench.aggregates``'), the run summary's.
Older baselines name ``flops_ratio_llm`` ``flops_ratio`` and carry no ``ttft_basis``: their
``ttft_ms`` was the batch latency (basis ``batch latency``).
      ]
    }

Verdicts, per metric (``CHECKS``):

- ``accuracy`` (higher is better, absolute): regressed when it drops by more than ``tol_acc`` points
  plus the 95% CI half-width (the larger of baseline's and current's), so small tasks do not flap;
- ``retention``, ``flops_ratio_llm``, ``flops_ratio_total`` (deterministic for a method and budget): "changed" when they move by
  more than ``tol_retention`` either way, a failure: the benchmark no longer measures the same thing;
- ``ttft_ms``, ``ttft_p90_ms``, ``speedup``, ``peak_mem_mb`` (device figures, relative): regressed when
  worse by more than ``tol_ttft`` (``tol_mem`` for memory). They are only compared when baseline and
  current ran on the same device (``timing="auto"``), and peak memory only when it is a per-batch
  allocator figure (not the CPU's process-lifetime RSS); TTFT only when both hold the same TTFT
  (``ttft_basis``: per sample, batch/b, or the batch latency).

A baseline cell that the current runs lack is "missing" (a failure unless ``allow_missing``); a current
cell the baseline lacks is "new".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from tokbench.aggregates import BATCH
from tokbench.report import aggregate, budget_sort_key
from tokbench.store import MANIFEST, Manifest

FORMAT_VERSION = 1
KEYS = ("model", "method", "budget", "task")


class BaselineError(ValueError):
    """An unreadable or inconsistent baseline."""


@dataclass(frozen=True)
class Check:
    metric: str
    better: str  # "higher" | "lower" | "same"
    scale: str  # "points" (absolute, x100) | "absolute" | "relative"
    tolerance: str  # which Tolerances field applies
    device: bool = False  # a figure of the hardware: compared only on the same device
    aliases: tuple[str, ...] = ()  # the metric's name in older baselines


CHECKS = (
    Check("accuracy", "higher", "points", "acc_pts"),
    Check("retention", "same", "absolute", "retention"),
    Check("flops_ratio_llm", "same", "absolute", "retention", aliases=("flops_ratio",)),
    Check("flops_ratio_total", "same", "absolute", "retention"),
    Check("ttft_ms", "lower", "relative", "ttft", device=True),
    Check("ttft_p90_ms", "lower", "relative", "ttft", device=True),
    Check("speedup", "higher", "relative", "ttft", device=True),
    Check("peak_mem_mb", "lower", "relative", "mem", device=True),
)


@dataclass(frozen=True)
class Tolerances:
    acc_pts: float = 0.5  # accuracy points (100 x score), widened by the CI half-width
    ttft: float = 0.10  # relative
    mem: float = 0.10  # relative
    retention: float = 0.01  # absolute
    timing: str = "auto"  # auto (same device) | on | off
    allow_missing: bool = False


def parse_fraction(text: str) -> float:
    """'10%' → 0.1, '0.1' → 0.1."""
    text = str(text).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"tolerance {text!r}: use a fraction (0.1) or a percentage (10%)") from None
    if value < 0 or math.isnan(value):
        raise ValueError(f"tolerance {text!r} must be >= 0")
    return value


# --- baselines ------------------------------------------------------------------------------------
def _devices(samples: pd.DataFrame) -> dict[str, str | None]:
    """run_dir → the device its manifest records."""
    devices = {}
    for run_dir in samples["run_dir"].unique():
        manifest = Path(run_dir) / MANIFEST
        devices[run_dir] = Manifest.from_file(manifest).environment.get("device") if manifest.exists() else None
    return devices


def entries_from_runs(paths: Sequence[Path], n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Baseline entries for the runs found in ``paths`` (run dirs or dirs holding them)."""
    from tokbench.store import load_runs

    samples = load_runs(list(paths))
    if samples.empty:
        raise BaselineError(f"no samples under {', '.join(map(str, paths))}")
    table = aggregate(samples, KEYS, n_boot, seed)
    twice = table[table.duplicated(list(KEYS), keep=False)]
    if not twice.empty:
        row = twice.iloc[0]
        same = twice[(twice[list(KEYS)] == row[list(KEYS)]).all(axis=1)]
        labels = " vs ".join("; ".join(p for p in (s, m) if p) for s, m in zip(same["settings"], same["method_settings"], strict=True))
        raise BaselineError(f"the runs hold {' '.join(str(row[k]) for k in KEYS)} with different settings ({labels}); "
                            "pass one set of runs")  # fmt: skip
    samples = samples.assign(device=samples["run_dir"].map(_devices(samples)))
    devices = samples.groupby(list(KEYS), sort=False)["device"].agg(lambda s: ",".join(sorted(set(s.dropna()))) or None)
    entries = []
    for _, row in table.iterrows():
        metrics = {c.metric: _number(row[c.metric]) for c in CHECKS}
        metrics["accuracy_ci_halfwidth"] = _number((row["acc_ci_high"] - row["acc_ci_low"]) / 2)
        key = tuple(row[k] for k in KEYS)
        entries.append({**{k: row[k] for k in KEYS}, "n": int(row["n"]), "device": devices.get(key),
                        "peak_mem_source": row["peak_mem_source"], "ttft_basis": row["ttft_basis"],
                        "settings": row["settings"], "metrics": metrics})  # fmt: skip
    return entries


def _number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 6)


def write_baseline(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """Write the baseline JSON of the runs in ``paths`` to ``out``; returns it."""
    from tokbench.store import _git_sha

    baseline = {
        "tokbench_baseline": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "sources": [str(p) for p in paths],
        "entries": entries_from_runs(paths),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(baseline, indent=2) + "\n", encoding="utf-8")
    return baseline


def _read_baseline_file(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise BaselineError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or "tokbench_baseline" not in data:
        raise BaselineError(f"{path} is not a tokbench baseline (no 'tokbench_baseline' key); make one with --write-baseline")
    if data["tokbench_baseline"] != FORMAT_VERSION:
        raise BaselineError(f"{path}: baseline format {data['tokbench_baseline']}, this tokbench reads {FORMAT_VERSION}")
    return data.get("entries", [])


def load_baseline(path: Path) -> list[dict[str, Any]]:
    """Entries from a baseline JSON file, a directory of them, or a directory of runs."""
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"baseline {path} does not exist")
    if path.is_file():
        entries = _read_baseline_file(path)
    else:
        files = sorted(path.glob("*.json"))
        entries = [e for f in files for e in _read_baseline_file(f)] if files else entries_from_runs([path])
    seen = set()
    for entry in entries:
        key = tuple(entry.get(k) for k in KEYS)
        if key in seen:
            raise BaselineError(f"baseline {path} has two entries for {' '.join(map(str, key))}")
        seen.add(key)
    return entries


# --- comparison -----------------------------------------------------------------------------------
def _verdict(check: Check, base: float, cur: float, tol: Tolerances, halfwidth: float) -> tuple[str, float, str]:
    """(verdict, delta, delta text) for one metric."""
    delta = cur - base
    if check.scale == "points":
        allowed = getattr(tol, check.tolerance) / 100 + halfwidth
        text = f"{delta * 100:+.1f} pts"
    elif check.scale == "absolute":
        allowed = getattr(tol, check.tolerance)
        text = f"{delta:+.4f}"
    else:
        allowed = getattr(tol, check.tolerance)
        delta = delta / base if base else (0.0 if cur == base else math.inf)
        text = f"{delta:+.1%}"
    margin = 1e-9
    if check.better == "same":
        return ("CHANGED" if abs(delta) > allowed + margin else "ok"), delta, text
    worse = -delta if check.better == "higher" else delta
    if worse > allowed + margin:
        return "REGRESSED", delta, text
    return ("improved" if -worse > allowed + margin else "ok"), delta, text


def _fmt_value(check: Check, value: float | None, halfwidth: float | None = None) -> str:
    if value is None:
        return "—"
    if check.scale == "points":
        return f"{value * 100:.1f}" + (f" ± {halfwidth * 100:.1f}" if halfwidth else "")
    if check.metric == "speedup":
        return f"{value:.2f}x"
    return f"{value:.4f}" if check.scale == "absolute" else f"{value:.1f}"


FAILING = ("REGRESSED", "CHANGED", "missing")


def _metric(entry: dict[str, Any], check: Check) -> float | None:
    metrics = entry["metrics"]
    return next((metrics[name] for name in (check.metric, *check.aliases) if metrics.get(name) is not None), None)


def compare(baseline: list[dict[str, Any]], current: list[dict[str, Any]], tol: Tolerances) -> pd.DataFrame:
    """One row per (cell, metric): cell, metric, baseline, current, delta, verdict (+ ``failed``)."""
    now = {tuple(e[k] for k in KEYS): e for e in current}
    then = {tuple(e.get(k) for k in KEYS): e for e in baseline}
    several_models = len({k[0] for k in [*now, *then]}) > 1
    rows = []
    for key in sorted(then.keys() | now.keys(), key=lambda k: (str(k[0]), k[1] != "full", str(k[1]), budget_sort_key(k[2]), str(k[3]))):
        cell = " ".join(str(k) for k in (key if several_models else key[1:]))
        base, cur = then.get(key), now.get(key)
        if cur is None or base is None:
            verdict = "missing" if cur is None else "new"
            rows.append({"cell": cell, "metric": "(all)", "baseline": "present" if base else "—",
                         "current": "present" if cur else "—", "delta": "", "verdict": verdict})  # fmt: skip
            continue
        same_device = base.get("device") == cur.get("device")
        same_ttft = base.get("ttft_basis", BATCH) == cur.get("ttft_basis", BATCH)
        for check in CHECKS:
            b, c = _metric(base, check), _metric(cur, check)
            b_hw, c_hw = base["metrics"].get("accuracy_ci_halfwidth"), cur["metrics"].get("accuracy_ci_halfwidth")
            row = {"cell": cell, "metric": check.metric, "baseline": _fmt_value(check, b, b_hw),
                   "current": _fmt_value(check, c, c_hw), "delta": ""}  # fmt: skip
            if b is None or c is None:
                row["verdict"] = "n/a"
            elif check.device and (tol.timing == "off" or (tol.timing == "auto" and not same_device)):
                row["verdict"] = "not compared (timing off)" if tol.timing == "off" else "not compared (other device)"
            elif check.metric in ("ttft_ms", "ttft_p90_ms") and not same_ttft:
                row["verdict"] = "not compared (TTFT basis differs)"
            elif check.metric == "peak_mem_mb" and "cuda" not in str(cur.get("peak_mem_source") or ""):
                row["verdict"] = "not compared (process RSS)"
            else:
                halfwidth = max(b_hw or 0.0, c_hw or 0.0)
                row["verdict"], _, row["delta"] = _verdict(check, b, c, tol, halfwidth)
            rows.append(row)
    table = pd.DataFrame(rows, columns=["cell", "metric", "baseline", "current", "delta", "verdict"])
    failing = FAILING if not tol.allow_missing else ("REGRESSED", "CHANGED")
    table["failed"] = table["verdict"].isin(failing)
    return table


def regress(baseline_path: Path, current_paths: Sequence[Path], tol: Tolerances) -> pd.DataFrame:
    return compare(load_baseline(baseline_path), entries_from_runs(current_paths), tol)


def to_markdown(table: pd.DataFrame, baseline_path: Path, tol: Tolerances) -> str:
    """The job-summary text: a verdict line, the tolerances, and the metric table."""
    failed = table[table["failed"]]
    if failed.empty:
        head = f"### tokbench regression check: PASS ({table['cell'].nunique()} cells)"
    else:
        names = ", ".join(f"{r.cell} {r.metric}" for r in failed.itertuples())
        head = f"### tokbench regression check: FAIL ({len(failed)}): {names}"
    tols = (f"baseline `{baseline_path}`; tolerances: accuracy {tol.acc_pts:g} pts + 95% CI half-width, "
            f"TTFT/speedup {tol.ttft:.0%}, memory {tol.mem:.0%}, retention/FLOPs ±{tol.retention:g}, "
            f"timing {tol.timing}")  # fmt: skip
    shown = table.drop(columns="failed").copy()
    shown.loc[table["failed"], "verdict"] = "**" + shown.loc[table["failed"], "verdict"] + "**"
    body = shown.to_markdown(index=False, disable_numparse=True, colalign=("left", "left", "right", "right", "right", "left"))
    return f"{head}\n\n{tols}\n\n{body}\n"
