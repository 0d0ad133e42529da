"""Results store: one run = one directory ``OUT/<run_id>/`` holding

- ``samples.jsonl``: one JSON object per sample (the DESIGN.md "Results schema", ``SAMPLE_FIELDS``),
  appended and fsync'd per batch, so a killed run loses at most the batch in flight;
- ``manifest.json``: run id, the config needed to rerun, the environment, timestamps and, once the
  run ends, its summary. Always replaced atomically (temporary file + ``os.replace``).

Rerunning with the same settings resumes: ``done_doc_ids`` tells the runner what to skip. Rerunning
with different settings into the same run directory is refused (``ConfigMismatchError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas

SAMPLE_FIELDS: tuple[str, ...] = (
    "run_id", "model", "method", "budget", "task", "doc_id", "prediction", "target", "score",
    "n_visual", "n_kept_input", "kept_per_layer",
    "retention", "retention_input", "retention_final", "retention_layer_avg",
    "flops_llm", "flops_vision", "flops_select", "flops_ratio_llm", "flops_ratio_total",
    # per span (tokbench.records.SPANS): the batch's latency and the per-sample amortised share
    *(f"{span}_{kind}" for span in ("preprocess", "vision", "select", "glimpse", "prefill", "ttft", "ttft_e2e",
                                    "decode", "e2e") for kind in ("batch_ms", "ms")),
    "decode_batch_ms_per_token", "decode_ms_per_token",
    "kv_cache_mb", "peak_mem_mb", "peak_mem_source", "nvml_peak_mb", "batch_size", "error",
)  # fmt: skip
# Optional keys a record may carry beyond the schema; written only when present.
OPTIONAL_FIELDS: tuple[str, ...] = (
    "kept_index", "token_grids", "image_sizes",  # --save-masks: kept indices per stage, (rows, cols) and (w, h) per image
    "question", "subset", "judge", "judge_reply", "judge_error",  # judged tasks (tokbench.judge)
)  # fmt: skip

SAMPLES = "samples.jsonl"
MANIFEST = "manifest.json"
RUN_LABELS = ("model", "method", "budget", "task")


class ConfigMismatchError(ValueError):
    """A run directory already holds results produced with different settings."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _slug(text: str, max_len: int = 60) -> str:
    """File-name-safe piece: 'Qwen/Qwen2.5-VL-7B' → 'Qwen-Qwen2.5-VL-7B'; a local path keeps its last part."""
    text = str(text)
    if text.startswith(("/", "./", "../", "~")):
        text = Path(text).name or text
    text = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.")
    return text[:max_len] or "none"


def make_run_id(config: dict[str, Any]) -> str:
    """``{model}__{method}__{budget}__{task}__{hash8}``, e.g. ``tiny-llava__fastv__r0.25__vstar__1a2b3c4d``.

    ``config`` must hold only the settings that define results (model, method and its arguments,
    budget, task, limit, seed, dtype, ...); ``hash8`` is the first 8 hex digits of the SHA-256 of
    its canonical JSON (sorted keys), so equal configs give equal ids whatever the key order.
    The budget part is ``budget_label`` if given, else ``n<budget>``, ``r<ratio>`` or ``full``.
    """
    budget = config.get("budget_label")
    if budget is None:
        if config.get("budget") is not None:
            budget = f"n{config['budget']}"
        elif config.get("ratio") is not None:
            budget = f"r{config['ratio']:g}"
        else:
            budget = "full"
    digest = hashlib.sha256(_canonical_json(config).encode()).hexdigest()[:8]
    parts = [config.get("model", "model"), config.get("method", "method"), budget, config.get("task", "task")]
    return "__".join([_slug(p) for p in parts] + [digest])


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync, then ``os.replace``; never a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    """Tensors / numpy scalars and arrays → Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int | None]:
    """Parse ``samples.jsonl``. Returns (records, good_size) where ``good_size`` is the byte length to
    truncate to when the final line is an unparsable fragment (a write cut off by a kill), else None.
    An unparsable line before the last one is corruption, not an interrupted append: raise."""
    if not path.exists():
        return [], None
    data = path.read_bytes()
    records, offset = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # no newline after it: the last append was cut off
                return records, start
            raise ValueError(f"{path}: line {number} is not valid JSON; the file is corrupt") from None
    if data and not data.endswith(b"\n"):  # complete JSON but the newline was lost: keep it, add one
        return records, -1
    return records, None


class RunStore:
    """One run directory: ``RunStore(root, run_id).path == root / run_id``. Call ``open`` first."""

    def __init__(self, root: Path, run_id: str, rank: int | None = None):
        """``rank``: a data-parallel process writing its own ``samples.rank<k>.jsonl`` (``merge_shards``)."""
        self.root = Path(root)
        self.run_id = run_id
        self.path = self.root / run_id
        self.samples_path = self.path / (SAMPLES if rank is None else f"samples.rank{rank}.jsonl")
        self.manifest_path = self.path / MANIFEST

    # --- manifest ---------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def open(self, config: dict[str, Any]) -> None:
        """Create the run directory and manifest, or resume one written with the same ``config``.

        Raises ``ConfigMismatchError`` naming each differing key if the manifest holds another config.
        Repairs ``samples.jsonl`` if its last line was cut off by a kill.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        config = json.loads(_canonical_json(config))  # compare as it will read back (tuples → lists)
        if self.manifest_path.exists():
            manifest = self.manifest()
            _check_same_config(self.path, manifest.get("config", {}), config)
            manifest.setdefault("resumed", []).append({"at": _now(), "environment": environment_info()})
        else:
            manifest = {"run_id": self.run_id, "config": config, "environment": environment_info()}
            manifest["created_at"] = _now()
        self._repair_samples()
        _write_atomically(self.manifest_path, json.dumps(manifest, indent=2, default=_json_default) + "\n")

    def update_manifest(self, **fields: Any) -> None:
        """Set top-level manifest fields (``summary=...``, ``finished_at=...``), atomically.
        ``run_id`` and ``config`` define the run and cannot be changed."""
        fixed = {"run_id", "config"} & fields.keys()
        if fixed:
            raise ValueError(f"manifest field(s) {', '.join(sorted(fixed))} are fixed when the run is opened")
        manifest = {**self.manifest(), **fields}
        text = json.dumps(manifest, indent=2, default=_json_default) + "\n"  # fails before touching the file
        _write_atomically(self.manifest_path, text)

    # --- samples ----------------------------------------------------------------------------------
    def _repair_samples(self) -> None:
        _, good_size = _read_lines(self.samples_path)
        if good_size == -1:
            with open(self.samples_path, "a", encoding="utf-8") as f:
                f.write("\n")
        elif good_size is not None:
            os.truncate(self.samples_path, good_size)

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in the order written (a cut-off final line is skipped)."""
        return _read_lines(self.samples_path)[0]

    def done_doc_ids(self) -> set[int]:
        """Doc ids that already have a record (error rows included: they are not retried)."""
        return {r["doc_id"] for r in self.records()}

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append records as JSON lines, then flush and fsync.

        Each record's keys must lie in ``SAMPLE_FIELDS`` (plus ``OPTIONAL_FIELDS``); schema fields it
        lacks are written as null; an unknown key or a missing ``doc_id`` raises before anything is
        written.
        """
        lines = _lines(records)
        if not lines:
            return
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def merge_shards(self) -> int:
        """Fold the ranks' ``samples.rank*.jsonl`` into ``samples.jsonl`` in doc-id order (doc ids already
        there are kept once), then delete the shards; returns how many records were added."""
        shards = sorted(self.path.glob("samples.rank*.jsonl"))
        done = self.done_doc_ids()
        new: dict[int, dict[str, Any]] = {}
        for shard in shards:
            for record in _read_lines(shard)[0]:
                if record["doc_id"] not in done:
                    new.setdefault(record["doc_id"], record)
        self.append([new[d] for d in sorted(new)])
        for shard in shards:
            shard.unlink()
        return len(new)

    def replace_records(self, records: list[dict[str, Any]]) -> None:
        """Replace every record at once (``tokbench judge`` filling in scores), atomically."""
        _write_atomically(self.samples_path, "".join(_lines(records)))


def _lines(records: list[dict[str, Any]]) -> list[str]:
    """Records as JSON lines in schema order; raises on an unknown key or a missing doc_id."""
    allowed = set(SAMPLE_FIELDS) | set(OPTIONAL_FIELDS)
    lines = []
    for index, record in enumerate(records):
        unknown = sorted(set(record) - allowed)
        if unknown:
            raise ValueError(f"record {index} has key(s) outside the results schema: {', '.join(unknown)}")
        if record.get("doc_id") is None:
            raise ValueError(f"record {index} has no doc_id")
        row = {k: record.get(k) for k in SAMPLE_FIELDS}
        row.update({k: record[k] for k in OPTIONAL_FIELDS if k in record})
        lines.append(json.dumps(row, default=_json_default) + "\n")
    return lines


def _check_same_config(run_dir: Path, stored: dict[str, Any], config: dict[str, Any]) -> None:
    missing = object()
    differ = sorted(k for k in stored.keys() | config.keys() if stored.get(k, missing) != config.get(k, missing))
    if not differ:
        return
    shown = "; ".join(f"{k}: {stored.get(k, '(unset)')!r} before, {config.get(k, '(unset)')!r} now" for k in differ)
    raise ConfigMismatchError(
        f"{run_dir} holds results made with other settings ({shown}); "
        "use another --output dir, or rerun with the same settings to resume"
    )


# --- environment ----------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    """Commit of the project checkout this package is imported from (``+dirty`` with local changes)."""
    project = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        command = ["git", "-C", str(project), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != project:
            return None  # installed inside some other repository, not our checkout
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"device": _cpu_model(), "device_count": 0, "cuda": None, "compute_capability": None}
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return {
            "device": torch.cuda.get_device_name(index),
            "device_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
        }
    return {"device": _cpu_model(), "device_count": 0, "cuda": None, "compute_capability": None}


def environment_info() -> dict[str, Any]:
    """Versions, project git sha, device and host, for the manifest."""
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "lmms_eval": _version("lmms_eval"),
        "tokbench": _version("tokbench"),
        "git_sha": _git_sha(),
        **_device(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "timestamp": _now(),
    }


# --- reading runs back ----------------------------------------------------------------------------
def _run_dirs(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / SAMPLES).exists() or (path / MANIFEST).exists():
        return [path]
    found = sorted({p.parent for p in path.rglob(SAMPLES)} | {p.parent for p in path.rglob(MANIFEST)})
    if not found:
        raise FileNotFoundError(f"no runs under {path} (no {SAMPLES} or {MANIFEST})")
    return found


def load_runs(paths: list[Path]) -> pandas.DataFrame:
    """One row per sample of every run found in ``paths`` (run directories, or directories holding
    them at any depth). Columns: ``SAMPLE_FIELDS`` (+ optional fields present), ``run_dir``; the
    run labels (model, method, budget, task, run_id) are filled from the manifest where a row lacks them.
    """
    import pandas as pd

    frames = []
    for run_dir in dict.fromkeys(d for p in paths for d in _run_dirs(p)):
        store = RunStore(run_dir.parent, run_dir.name)
        manifest = store.manifest() if store.manifest_path.exists() else {}
        frame = pd.DataFrame(store.records())
        frame = frame.reindex(columns=list(dict.fromkeys([*SAMPLE_FIELDS, *frame.columns])))
        for key, value in _manifest_labels(manifest).items():
            if value is not None:
                frame[key] = frame[key].astype(object).where(frame[key].notna(), value)
        frame["run_dir"] = str(run_dir)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*SAMPLE_FIELDS, "run_dir"])
    return pd.concat(frames, ignore_index=True)


def _manifest_labels(manifest: dict[str, Any]) -> dict[str, Any]:
    config = manifest.get("config", {})
    budget = config.get("budget_label")
    if budget is None and config.get("budget") is not None:
        budget = f"n{config['budget']}"
    elif budget is None and config.get("ratio") is not None:
        budget = f"r{config['ratio']:g}"
    labels = {k: config.get(k) for k in ("model", "method", "task")}
    return {"run_id": manifest.get("run_id"), **labels, "budget": budget}
