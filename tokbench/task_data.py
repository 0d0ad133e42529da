"""Where a task's data comes from: ``--data-dir`` layouts as lmms-eval config overrides, and the hub
cache when the hub cannot be used (``tokbench.tasks`` module docstring lists the layouts)."""

from __future__ import annotations

import os
from pathlib import Path

_LOCAL_BUILDERS = {"json", "parquet", "csv", "arrow", "text", "pandas", "imagefolder", "audiofolder", "webdataset"}
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


class TaskError(ValueError):
    """A task name or its data cannot be resolved (one-line message)."""


def data_override(name: str, config: dict, data_dir: str | None) -> tuple[dict, Path | None]:
    """Config keys that point the task at local data (empty when it reads its usual source)."""
    from tokbench.synth import data_root, ensure_vstar_synth
    from tokbench.synth.vstar import VARIANTS

    split = config.get("test_split") or config.get("validation_split") or "test"
    if name.startswith("visual_cot"):
        return _visual_cot_override(name, split, data_dir)
    if name in VARIANTS:
        path = Path(data_dir).expanduser() if data_dir else ensure_vstar_synth(**VARIANTS[name])
        parquet = path if path.is_file() else path / "test.parquet"
        if not parquet.is_file():
            raise TaskError(f"task {name}: no test.parquet in {path} (make one with tokbench.synth.generate_vstar_synth)")
        kwargs = {"data_files": {split: str(parquet)}, "cache_dir": str(data_root() / "hf-datasets")}
        return {"dataset_path": "parquet", "dataset_name": None, "dataset_kwargs": kwargs}, parquet.parent
    if data_dir is None:
        return {}, None
    path = Path(data_dir).expanduser().resolve()
    if not path.exists():
        raise TaskError(f"data dir {path} for task {name} does not exist")
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise TaskError(f"data file {path} for task {name}: use {', '.join(sorted(_FILE_BUILDERS))}")
        kwargs = {"data_files": {split: str(path)}, "cache_dir": str(data_root() / "hf-datasets")}
        return {"dataset_path": builder, "dataset_name": None, "dataset_kwargs": kwargs}, path.parent
    if (path / "dataset_dict.json").is_file():
        return {"dataset_path": str(path), "dataset_name": None, "dataset_kwargs": {"load_from_disk": True}}, path
    if (path / "state.json").is_file():
        raise TaskError(f"{path} holds a single saved Dataset; save a DatasetDict with a {split!r} split instead")
    kwargs = dict(config.get("dataset_kwargs") or {})  # a hub snapshot: name and data_files resolve inside it
    if "video" not in kwargs:
        kwargs.setdefault("cache_dir", str(data_root() / "hf-datasets"))
    return {"dataset_path": str(path), "dataset_kwargs": kwargs}, path


def _visual_cot_override(name: str, split: str, data_dir: str | None) -> tuple[dict, Path]:
    """Visual-CoT tasks read one table built from the official layout (tokbench.visual_cot)."""
    from tokbench.synth import data_root
    from tokbench.synth.visual_cot import ensure_visual_cot_synth
    from tokbench.visual_cot import VisualCoTError, build_table, subsets_for

    if data_dir is None and name != "visual_cot_synth":
        raise TaskError(
            f"task {name} needs the Visual-CoT benchmark: pass --data-dir with the viscot_benchmark folder "
            "and its images (docs/tasks.md)"
        )
    source = Path(data_dir).expanduser().resolve() if data_dir else ensure_visual_cot_synth()
    try:
        parquet = build_table(source, subsets_for(name))
    except VisualCoTError as err:
        raise TaskError(f"task {name}: {err}") from None
    kwargs = {"data_files": {split: str(parquet)}, "cache_dir": str(data_root() / "hf-datasets")}
    return {"dataset_path": "parquet", "dataset_name": None, "dataset_kwargs": kwargs}, source


def offline_source(name: str, config: dict) -> Path | None:
    """Where a hub dataset loads from when the hub cannot be used, checked before lmms-eval tries.

    None: load as usual (a local path, a prepared ``datasets`` cache, or the network is on). A snapshot
    directory: the hub cache holds the dataset's files (``hf download``) but ``datasets`` cannot use
    them offline, so they are read as a local copy. Otherwise one line saying what to download and pass
    (without this check lmms-eval retries the download 5 times: seconds offline, minutes when DNS fails).
    """
    dataset = config.get("dataset_path")
    if not isinstance(dataset, str) or "/" not in dataset or dataset in _LOCAL_BUILDERS:
        return None
    if os.path.exists(os.path.expanduser(dataset)) or _in_datasets_cache(dataset, config.get("dataset_kwargs")):
        return None
    offline_vars = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in offline_vars):
        why = "the network is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    elif not _hub_reachable():
        why = "the hub cannot be reached"
    else:
        return None
    snapshot = _hub_snapshot(dataset)
    if snapshot is not None:
        return snapshot
    raise TaskError(
        f"task {name} needs dataset {dataset}, which is not in the local HF cache and {why}; "
        f"download it (hf download --repo-type dataset {dataset} --local-dir DIR) and pass --data-dir DIR"
    )


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()


def _in_datasets_cache(dataset: str, dataset_kwargs) -> bool:
    """Whether a ``datasets`` cache has a prepared copy of ``dataset`` (a cheap heuristic)."""
    env = os.environ.get
    caches = [env("LMMS_EVAL_DATASETS_CACHE"), env("HF_DATASETS_CACHE"), _hf_home() / "datasets"]
    if isinstance(dataset_kwargs, dict):
        caches.append(dataset_kwargs.get("cache_dir"))
    wanted = dataset.replace("/", "___").lower()
    for cache in caches:
        directory = Path(cache).expanduser() if cache else None
        if directory and directory.is_dir() and any(child.name.lower() == wanted for child in directory.iterdir()):
            return True
    return False


def _hub_snapshot(dataset: str) -> Path | None:
    """The hub cache's snapshot of dataset repo ``dataset`` (``refs/main``, else the newest one)."""
    env = os.environ.get
    hub = Path(env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub").expanduser()
    repo = hub / ("datasets--" + dataset.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = sorted((repo / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1] if snapshots else None


def _hub_reachable() -> bool:
    """DNS lookup of the hub's host (skipped, i.e. True, behind a proxy)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
