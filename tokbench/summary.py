"""A run's summary from its sample records: what the manifest stores and the CLI prints.

Figures are computed over rows without an error; a field that is null in a row (e.g. no score) is
left out of that field's mean. Every value is a plain float/int or ``None`` (JSON-ready).
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table
from rich.text import Text

# summary key -> (record field, aggregate)
_MEANS = {
    "accuracy": "score",
    "retention": "retention",
    "retention_input": "retention_input",
    "retention_final": "retention_final",
    "retention_layer_avg": "retention_layer_avg",
    "flops_ratio": "flops_ratio",
    "ttft_ms": "ttft_ms",
    "e2e_ms": "e2e_ms",
    "kv_cache_mb": "kv_cache_mb",
}


def _values(rows: list[dict[str, Any]], field: str) -> list[float]:
    out = []
    for row in rows:
        value = row.get(field)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out.append(float(value))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean_over_subsets(pairs: list[tuple[str, float]]) -> float | None:
    """Mean score per subset, then the unweighted mean of those (Visual-CoT's average over subsets)."""
    by_subset: dict[str, list[float]] = {}
    for subset, score in pairs:
        by_subset.setdefault(subset, []).append(float(score))
    return _mean([sum(v) / len(v) for v in by_subset.values()])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """n, n_errors; over rows without an error: accuracy (mean score), mean retention figures,
    mean flops_ratio, mean / p50 / p90 ttft_ms, mean e2e_ms and kv_cache_mb, max peak_mem_mb.

    Judged tasks (rows with a ``judge`` key) add ``n_unscored`` (predictions the judge has not scored
    yet); rows with a ``subset`` make accuracy the unweighted mean over subsets, with
    ``accuracy_by_subset``.
    """
    ok = [r for r in records if r.get("error") is None]
    summary: dict[str, Any] = {"n": len(records), "n_errors": len(records) - len(ok)}
    for key, field in _MEANS.items():
        summary[key] = _mean(_values(ok, field))
    if any("judge" in r for r in ok):
        summary["n_unscored"] = sum(1 for r in ok if r.get("score") is None)
    scored = [(r["subset"], r["score"]) for r in ok if r.get("subset") is not None and r.get("score") is not None]
    if scored:
        summary["accuracy"] = mean_over_subsets(scored)
        summary["accuracy_by_subset"] = {s: mean_over_subsets([p for p in scored if p[0] == s]) for s in sorted({s for s, _ in scored})}
    ttft = _values(ok, "ttft_ms")
    summary["ttft_p50_ms"] = _percentile(ttft, 50)
    summary["ttft_p90_ms"] = _percentile(ttft, 90)
    peaks = _values(ok, "peak_mem_mb")
    summary["peak_mem_mb"] = max(peaks) if peaks else None
    sources = sorted({r["peak_mem_source"] for r in ok if r.get("peak_mem_source")})
    summary["peak_mem_source"] = ",".join(sources) or None
    return summary


_ROWS = (  # (key, label, format)
    ("n", "samples", "{:d}"),
    ("n_errors", "errors", "{:d}"),
    ("n_unscored", "not yet judged", "{:d}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("retention", "retention (headline)", "{:.1%}"),
    ("retention_input", "retention, LLM input", "{:.1%}"),
    ("retention_final", "retention, final", "{:.1%}"),
    ("retention_layer_avg", "retention, layer average", "{:.1%}"),
    ("flops_ratio", "prefill FLOPs vs full", "{:.1%}"),
    ("ttft_ms", "TTFT mean (ms)", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_p90_ms", "TTFT p90 (ms)", "{:.1f}"),
    ("e2e_ms", "end-to-end mean (ms)", "{:.1f}"),
    ("kv_cache_mb", "KV cache mean (MB)", "{:.2f}"),
    ("peak_mem_mb", "peak memory max (MB)", "{:.1f}"),
)


def summary_table(summary: dict[str, Any], title: str) -> Table:
    """Two-column rich table of ``summarize``'s output; missing figures show as '—'."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, label, fmt in _ROWS:
        if key not in summary:
            continue
        value = summary[key]
        if key == "peak_mem_mb" and summary.get("peak_mem_source"):
            label = f"{label}, {summary['peak_mem_source']}"
        table.add_row(Text(label), "—" if value is None else fmt.format(value))
    return table
