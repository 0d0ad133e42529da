"""Every aggregate of per-sample rows, defined once: the run summary, ``report``, ``regress``, ``plot``
and ``html`` all call ``aggregate`` (one group of rows) and ``paired`` (a group against its ``full``).

Definitions (fractions 0-1; rows whose ``error`` is set are counted in ``n_errors`` and left out of
every figure; a field that a row lacks or holds as null/NaN is left out of that field's aggregate):

- ``accuracy``: the mean score. When rows carry a ``subset`` (Visual-CoT), the mean score of each
  subset, then the unweighted mean over subsets (the published tables' average); ``accuracy_micro``
  is then the pooled mean over all scored rows and ``accuracy_by_subset`` each subset's mean.
- ``acc_ci_low`` / ``acc_ci_high``: percentile bootstrap 95% CI of ``accuracy`` (seeded; with
  subsets, rows are resampled within each subset and the subset means averaged).
- ``FIGURES``: one entry per figure (summary key, row field(s), mean / p50 / p90 / max).
- ``ttft_basis``: what the time figures are: ``per sample, batch/b`` (rows that carry the batch
  latency ``ttft_batch_ms`` beside the amortised ``ttft_ms``), ``batch latency`` (older rows, whose
  ``ttft_ms`` is the batch latency), or ``mixed``.
- ``paired``: documents scored by both, by ``doc_id``; ``acc_diff`` is the mean paired score
  difference (subset-macro as ``accuracy``) with its paired bootstrap CI; ``agreement`` is the
  fraction of documents predicted by both where the normalised predictions are identical
  (EffiVLM-Bench's loyalty to the uncompressed model), with a bootstrap CI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Figure:
    """A summary figure: ``key`` aggregates the first of ``fields`` a row holds with ``how``."""

    key: str
    fields: tuple[str, ...]  # the row field, then older names for it
    how: str = "mean"  # mean | p50 | p90 | max


_SPANS = ("preprocess", "vision", "select", "glimpse", "prefill", "ttft", "ttft_e2e", "decode", "e2e")
FIGURES: tuple[Figure, ...] = (
    *(Figure(k, (k,)) for k in ("retention", "retention_input", "retention_final", "retention_layer_avg")),
    Figure("flops_ratio_llm", ("flops_ratio_llm", "flops_ratio")),
    *(Figure(k, (k,)) for k in ("flops_ratio_total", "flops_llm", "flops_vision", "flops_select")),
    *(Figure(f"{s}_ms", (f"{s}_ms",)) for s in _SPANS),  # per sample: batch latency / b
    Figure("ttft_p50_ms", ("ttft_ms",), "p50"),
    Figure("ttft_p90_ms", ("ttft_ms",), "p90"),
    *(Figure(f"{s}_batch_ms", (f"{s}_batch_ms",)) for s in _SPANS),  # batch latency
    Figure("decode_ms_per_token", ("decode_ms_per_token",)),
    Figure("decode_batch_ms_per_token", ("decode_batch_ms_per_token",)),
    Figure("kv_cache_mb", ("kv_cache_mb",)),
    Figure("peak_mem_mb", ("peak_mem_mb",), "max"),
    Figure("nvml_peak_mb", ("nvml_peak_mb",), "max"),
)
PER_SAMPLE, BATCH, MIXED = "per sample, batch/b", "batch latency", "mixed"


def present(value: Any) -> bool:
    """Not None and not a float NaN (rows read back through pandas carry NaN for absent fields)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def failed(row: dict[str, Any]) -> bool:
    return present(row.get("error"))


def _field(row: dict[str, Any], fields: tuple[str, ...]) -> float | None:
    for name in fields:
        if present(row.get(name)):
            return float(row[name])
    return None


def _reduce(values: list[float], how: str) -> float | None:
    if not values:
        return None
    if how == "mean":
        return float(np.mean(values))
    if how == "max":
        return float(max(values))
    return float(np.percentile(values, {"p50": 50, "p90": 90}[how]))  # linear interpolation


# --- scores -----------------------------------------------------------------------------------------
def score_mean(scores: Sequence[float], subsets: Sequence[Any] | None = None) -> float:
    """Mean of ``scores``; with ``subsets`` (one label per score) the unweighted mean of subset means."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        return float("nan")
    if subsets is None:
        return float(values.mean())
    labels = np.asarray(subsets, dtype=object)
    return float(np.mean([values[labels == s].mean() for s in sorted(set(labels))]))


def mean_over_subsets(pairs: list[tuple[str, float]]) -> float | None:
    """``score_mean`` over (subset, score) pairs; None when empty (lmms-eval's aggregation hook)."""
    if not pairs:
        return None
    subsets, scores = zip(*pairs, strict=True)
    return score_mean(scores, subsets)


def _boot_means(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    chunk = max(1, 2_000_000 // values.size)  # bounded memory for large tasks
    means = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, values.size, size=(min(chunk, n_boot - start), values.size))
        means.append(values[idx].mean(axis=1))
    return np.concatenate(means)


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
                 subsets: Sequence[Any] | None = None) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap CI of ``score_mean(values, subsets)``, resampling entries with replacement
    (within each subset when ``subsets`` is given). Pass per-document differences for a paired CI.
    Seeded: the same input gives the same interval."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if subsets is None:
        means = _boot_means(values, rng, n_boot)
    else:
        labels = np.asarray(subsets, dtype=object)
        means = np.mean([_boot_means(values[labels == s], rng, n_boot) for s in sorted(set(labels))], axis=0)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _subset(row: dict[str, Any]) -> Any:
    return row["subset"] if present(row.get("subset")) else None


def _accuracy(ok: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    scored = [r for r in ok if present(r.get("score"))]
    scores = [float(r["score"]) for r in scored]
    labels = [_subset(r) for r in scored]
    by_subset = any(label is not None for label in labels)
    subsets = [str(label) for label in labels] if by_subset else None
    low, high = bootstrap_ci(scores, n_boot, seed, subsets=subsets)
    out: dict[str, Any] = {"accuracy": score_mean(scores, subsets) if scores else None,
                           "acc_ci_low": low if scores else None, "acc_ci_high": high if scores else None}  # fmt: skip
    if by_subset:
        out["accuracy_micro"] = score_mean(scores)
        out["accuracy_by_subset"] = {s: score_mean([v for v, t in zip(scores, subsets) if t == s]) for s in sorted(set(subsets))}
    return out


def ttft_basis(ok: list[dict[str, Any]]) -> str | None:
    """Which TTFT the time figures are (see the module docstring); None without timed rows."""
    timed = [r for r in ok if present(r.get("ttft_ms"))]
    if not timed:
        return None
    kinds = {PER_SAMPLE if present(r.get("ttft_batch_ms")) else BATCH for r in timed}
    return kinds.pop() if len(kinds) == 1 else MIXED


def aggregate(rows: list[dict[str, Any]], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The figures of one group of rows: ``n``, ``n_errors``, (judged tasks) ``n_unscored``, accuracy
    and its CI (+ micro mean and per-subset means), every ``FIGURES`` key, ``peak_mem_source`` and
    ``ttft_basis``. Values are plain floats/ints/str or None (JSON-ready)."""
    ok = [r for r in rows if not failed(r)]
    out: dict[str, Any] = {"n": len(rows), "n_errors": len(rows) - len(ok)}
    judged = [r for r in ok if "judge" in r and (r["judge"] is None or present(r["judge"]))]  # NaN: a padded column
    if judged:
        out["n_unscored"] = sum(1 for r in judged if not present(r.get("score")))
    out.update(_accuracy(ok, n_boot, seed))
    for figure in FIGURES:
        out[figure.key] = _reduce([v for r in ok if (v := _field(r, figure.fields)) is not None], figure.how)
    sources = sorted({str(r["peak_mem_source"]) for r in ok if present(r.get("peak_mem_source"))})
    out["peak_mem_source"] = ",".join(sources) or None
    out["ttft_basis"] = ttft_basis(ok)
    return out


# --- a group against its reference ----------------------------------------------------------------
def normalize_prediction(text: Any) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes/punctuation stripped: 'The cat.' == 'the cat'."""
    return re.sub(r"\s+", " ", str(text)).strip().strip(".,;:!?\"'`").strip().casefold()


def _per_doc(rows: list[dict[str, Any]], field: str) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = {}
    for row in rows:
        if not failed(row) and present(row.get(field)):
            out.setdefault(row["doc_id"], []).append(row[field])
    return out


def paired(rows: list[dict[str, Any]], ref_rows: list[dict[str, Any]], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """``rows`` against ``ref_rows`` (the ``full`` run), paired by ``doc_id`` (several runs of a group:
    per-document means). Returns ``acc_diff`` (+ CI, ``n_paired``) and ``agreement`` (+ CI, ``n_agree``)."""
    own, ref = _per_doc(rows, "score"), _per_doc(ref_rows, "score")
    docs = [d for d in own if d in ref]
    subset_of = {r["doc_id"]: _subset(r) for r in rows}
    labels = [subset_of.get(d) for d in docs]
    subsets = [str(s) for s in labels] if any(s is not None for s in labels) else None
    diffs = [float(np.mean(own[d])) - float(np.mean(ref[d])) for d in docs]
    low, high = bootstrap_ci(diffs, n_boot, seed, subsets=subsets)
    out: dict[str, Any] = {"acc_diff": score_mean(diffs, subsets), "acc_diff_ci_low": low, "acc_diff_ci_high": high,
                           "n_paired": len(docs)}  # fmt: skip
    said, ref_said = _per_doc(rows, "prediction"), _per_doc(ref_rows, "prediction")
    docs = [d for d in said if d in ref_said]
    same = [float(np.mean([normalize_prediction(a) == normalize_prediction(b) for a in said[d] for b in ref_said[d]]))
            for d in docs]  # fmt: skip
    low, high = bootstrap_ci(same, n_boot, seed)
    out.update(agreement=float(np.mean(same)) if same else float("nan"), agreement_ci_low=low, agreement_ci_high=high,
               n_agree=len(docs))  # fmt: skip
    return out
