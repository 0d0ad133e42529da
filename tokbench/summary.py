"""A run's summary from its sample records: what the manifest stores and the CLI prints.

The figures are ``tokbench.aggregates.aggregate``'s, the one definition ``report``, ``regress``,
``plot`` and ``html`` use too (see that module for each definition).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from tokbench.aggregates import aggregate, mean_over_subsets

__all__ = ["mean_over_subsets", "summarize", "summary_table"]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``aggregate(records)``: the run's summary (JSON-ready)."""
    return aggregate(records)


_ROWS = (  # (key, label, format)
    ("n", "samples", "{:d}"),
    ("n_errors", "errors", "{:d}"),
    ("n_unscored", "not yet judged", "{:d}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("accuracy_micro", "accuracy, pooled over subsets (micro)", "{:.4f}"),
    ("retention", "retention (headline)", "{:.1%}"),
    ("retention_input", "retention, LLM input", "{:.1%}"),
    ("retention_final", "retention, final", "{:.1%}"),
    ("retention_layer_avg", "retention, layer average", "{:.1%}"),
    ("flops_ratio_llm", "LLM prefill FLOPs vs full", "{:.1%}"),
    ("flops_ratio_total", "total FLOPs vs full", "{:.1%}"),
    ("ttft_ms", "TTFT mean (ms)", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_p90_ms", "TTFT p90 (ms)", "{:.1f}"),
    ("ttft_batch_ms", "TTFT of a batch, mean (ms)", "{:.1f}"),
    ("e2e_ms", "end-to-end mean (ms)", "{:.1f}"),
    ("decode_ms_per_token", "decode ms/token", "{:.2f}"),
    ("kv_cache_mb", "KV cache mean (MB)", "{:.2f}"),
    ("peak_mem_mb", "peak memory max (MB)", "{:.1f}"),
    ("nvml_peak_mb", "peak memory max (MB), NVML", "{:.1f}"),
)
_OPTIONAL = {"n_unscored", "accuracy_micro", "flops_ratio_total", "ttft_batch_ms", "nvml_peak_mb"}  # shown when present


def summary_table(summary: dict[str, Any], title: str) -> Table:
    """Two-column rich table of ``summarize``'s output; missing figures show as '—'. Accuracy carries
    its 95% CI; time figures say which TTFT they are (``ttft_basis``)."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    basis = summary.get("ttft_basis")
    for key, label, fmt in _ROWS:
        value = summary.get(key)
        if key not in summary or (key in _OPTIONAL and value is None):
            continue
        text = "—" if value is None else fmt.format(value)
        if key == "accuracy" and value is not None and summary.get("acc_ci_low") is not None:
            text += f" [{summary['acc_ci_low']:.4f}, {summary['acc_ci_high']:.4f}]"
            label += ", 95% CI" + (" (unweighted mean over subsets)" if "accuracy_micro" in summary else "")
        if key in ("ttft_ms", "ttft_p50_ms", "ttft_p90_ms", "e2e_ms", "decode_ms_per_token") and basis:
            label = f"{label}, {basis}"
        if key == "peak_mem_mb" and summary.get("peak_mem_source"):
            label = f"{label}, {summary['peak_mem_source']}"
        table.add_row(Text(label), text)
    for subset, value in (summary.get("accuracy_by_subset") or {}).items():
        table.add_row(Text(f"accuracy, {subset}"), "—" if value is None else f"{value:.4f}")
    return table
