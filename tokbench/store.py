"""Results store: one run = one directory ``OUT/<run_id>/`` holding

- ``samples.jsonl``: one JSON object per sample (the DESIGN.md "Results schema", ``SAMPLE_FIELDS``),
  appended and fsync'd per batch, so a killed run loses at most the batch in flight;
- ``manifest.json``: run id, the config needed to rerun, the environment, timestamps and, once the
  run ends, its summary. Always replaced atomically (temporary file + ``os.replace``).

Rerunning with the same settings resumes: ``done_doc_ids`` tells the runner what to skip. Rerunning
with different settings, or over data that changed since the run started (``data_fingerprint``), into the
same run directory is refused (``ConfigMismatchError``, ``DataChangedError``). Files are created with the
user's umask (``0644`` under the usual ``022``). A full disk raises ``DiskFullError`` naming the file and
the command that resumes; what was written before stays.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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
    "kv_cache_mb", "peak_mem_mb", "nvml_peak_mb", "peak_mem_source", "batch_size", "error",
)  # fmt: skip
# Optional keys a record may carry beyond the schema; written only when present.
OPTIONAL_FIELDS: tuple[str, ...] = (
    "kept_index", "token_tiles", "image_sizes",  # --save-masks: kept indices per stage, tiles and (w, h) per image
    "question", "subset", "judge", "judge_reply", "judge_error",  # judged tasks (tokbench.judge)
)  # fmt: skip

SAMPLES = "samples.jsonl"
MANIFEST = "manifest.json"
RUN_LABELS = ("model", "method", "budget", "task")


class ConfigMismatchError(ValueError):
    """A run directory already holds results produced with different settings."""


class DataChangedError(ConfigMismatchError):
    """The task's data differs from the data the run directory's results were made from."""


class ManifestError(ValueError):
    """``manifest.json`` is not valid JSON or lacks a key every manifest has (one line naming the file)."""


class DiskFullError(RuntimeError):
    """No space left (ENOSPC / EDQUOT) while writing a run file; rows written before are kept."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Manifest:
    """``manifest.json``: what defines the run (``run_id``, ``config``, ``data``) and what happened to it.

    ``data`` is ``tokbench.fingerprint.data_fingerprint`` of the task when the run started (``None`` in
    runs made before it was recorded); ``judged_by`` counts scored rows per judge name (``tokbench.judge``);
    keys this class does not name are kept in ``extra`` and written back unchanged.
    """

    run_id: str
    config: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    data: dict[str, Any] | None = None
    resumed: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    judged_by: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Path | str = MANIFEST) -> Manifest:
        if not isinstance(values, dict):
            raise ManifestError(f"{source} holds a JSON {type(values).__name__}, not a run manifest")
        missing = [k for k in ("run_id", "config") if k not in values]
        if missing:
            raise ManifestError(f"{source} lacks {', '.join(missing)}; it is not a complete tokbench manifest")
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in values.items() if k in names}
        return cls(**known, extra={k: v for k, v in values.items() if k not in names})

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        """Read ``path``; ``ManifestError`` (one line naming it) when it is not valid JSON or lacks keys."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as err:
            raise ManifestError(f"{path} is not valid JSON ({err}); restore it or start the run in a new --output") from None
        return cls.from_dict(values, path)

    def to_dict(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**{k: v for k, v in values.items() if v is not None}, **self.extra}


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


def _umask_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the user's umask (0o644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync, then ``os.replace``; never a partial file.
    The file gets the user's umask, like any file ``open()`` creates (``mkstemp`` alone would make it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PROBE_BYTES = 1 << 20  # the pre-flight writes this much: a full disk fails here, not after the model loaded


def probe_output_dir(out: Path) -> None:
    """Pre-flight: create ``out`` and write, fsync and delete a 1 MiB probe file in it.

    A full disk or quota raises ``DiskFullError`` (one line naming ``out``); other ``OSError`` s (no
    permission, read-only) propagate. Creating an empty file succeeds on a full disk, hence the bytes.
    """
    out = Path(out)
    probe = out / f".tokbench-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.errno not in _FULL:
            raise
        raise DiskFullError(
            f"no space left on the device for output dir {out} ({err.strerror}); free space or pass --output DIR"
        ) from None
    finally:
        probe.unlink(missing_ok=True)


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

    def __init__(self, root: Path, run_id: str, rank: int | None = None, resume: str = "rerun the same command"):
        """``rank``: a data-parallel process writing its own ``samples.rank<k>.jsonl`` (``merge_shards``);
        ``resume``: the command that carries on after a full disk, for ``DiskFullError``'s message."""
        self.root = Path(root)
        self.run_id = run_id
        self.path = self.root / run_id
        self.samples_path = self.path / (SAMPLES if rank is None else f"samples.rank{rank}.jsonl")
        self.manifest_path = self.path / MANIFEST
        self.resume = resume

    # --- manifest ---------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The manifest as a plain dict (``read_manifest`` for the typed form)."""
        return self.read_manifest().to_dict()

    def read_manifest(self) -> Manifest:
        return Manifest.from_file(self.manifest_path)

    def open(self, config: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        """Create the run directory and manifest, or resume one written with the same ``config`` and data.

        ``data``: the task's ``data_fingerprint``. Raises ``ConfigMismatchError`` naming each differing
        key if the manifest holds another config, ``DataChangedError`` if it records other data.
        Repairs ``samples.jsonl`` if its last line was cut off by a kill.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        config = json.loads(_canonical_json(config))  # compare as it will read back (tuples → lists)
        data = json.loads(_canonical_json(data)) if data is not None else None
        if self.manifest_path.exists():
            manifest = self.read_manifest()
            _check_same_config(self.path, manifest.config, config)
            _check_same_data(self.path, manifest.data, data)
            manifest.data = manifest.data or data
            manifest.resumed.append({"at": _now(), "environment": environment_info()})
        else:
            manifest = Manifest(self.run_id, config, environment_info(), created_at=_now(), data=data)
        self._repair_samples()
        self._write_manifest(manifest)

    def update_manifest(self, **fields: Any) -> None:
        """Set top-level manifest fields (``summary=...``, ``finished_at=...``), atomically.
        ``run_id``, ``config`` and ``data`` define the run and cannot be changed."""
        fixed = {"run_id", "config", "data"} & fields.keys()
        if fixed:
            raise ValueError(f"manifest field(s) {', '.join(sorted(fixed))} are fixed when the run is opened")
        values = {**self.read_manifest().to_dict(), **fields}
        self._write_manifest(Manifest.from_dict(values, self.manifest_path))

    def _write_manifest(self, manifest: Manifest) -> None:
        text = json.dumps(manifest.to_dict(), indent=2, default=_json_default) + "\n"  # fails before touching the file
        with self._full_disk(self.manifest_path):
            write_atomically(self.manifest_path, text)

    @contextlib.contextmanager
    def _full_disk(self, path: Path) -> Iterator[None]:
        """Turn ENOSPC / EDQUOT inside the block into one ``DiskFullError`` line naming ``path`` and the resume."""
        try:
            yield
        except OSError as err:
            if err.errno not in _FULL:
                raise
            kept = len(self.records()) if self.samples_path.exists() else 0
            raise DiskFullError(
                f"no space left on the device writing {path} ({err.strerror}); {kept} row(s) are saved; "
                f"free space, then {self.resume} to resume"
            ) from None

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
        written. An append cut short by a full disk is undone (the file is truncated to its previous size) and
        raises ``DiskFullError``: the rows of earlier appends stay, this batch is redone on resume.
        """
        lines = _lines(records)
        if not lines:
            return
        size = self.samples_path.stat().st_size if self.samples_path.exists() else 0
        with self._full_disk(self.samples_path):
            try:
                with open(self.samples_path, "a", encoding="utf-8") as f:
                    f.write("".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                os.truncate(self.samples_path, size)
                raise

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
        text = "".join(_lines(records))
        with self._full_disk(self.samples_path):
            write_atomically(self.samples_path, text)


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


def _check_same_data(run_dir: Path, stored: dict[str, Any] | None, data: dict[str, Any] | None) -> None:
    """Refuse to resume over other data; a manifest from before fingerprints (``None``) is not compared."""
    if stored is None or data is None or stored.get("fingerprint") == data.get("fingerprint"):
        return
    raise DataChangedError(
        f"the data of {run_dir} changed since the run started ({stored.get('docs')} docs, fingerprint "
        f"{stored.get('fingerprint')} before; {data.get('docs')} docs, {data.get('fingerprint')} now, from "
        f"{data.get('source')}); restore the data or use another --output dir"
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
        manifest = store.read_manifest() if store.manifest_path.exists() else None
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


def _manifest_labels(manifest: Manifest | None) -> dict[str, Any]:
    if manifest is None:
        return {}
    config = manifest.config
    budget = config.get("budget_label")
    if budget is None and config.get("budget") is not None:
        budget = f"n{config['budget']}"
    elif budget is None and config.get("ratio") is not None:
        budget = f"r{config['ratio']:g}"
    labels = {k: config.get(k) for k in ("model", "method", "task")}
    return {"run_id": manifest.run_id, **labels, "budget": budget}
