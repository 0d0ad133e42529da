"""Tasks the runner evaluates: lmms-eval task objects behind a small typed interface.

Every task is an lmms-eval task: tokbench's own folders (``TASKS_DIR`` = ``tokbench/lmms_tasks``, shipped
in the wheel; in a checkout a link to ``tasks/``; passed to lmms-eval as an include path) or any task
lmms-eval ships (``gqa``, ``pope``, ...). Prompts (``doc_to_text`` with the task's pre/post prompts),
images (``doc_to_visual``), targets and scores (``process_results``) all come from lmms-eval's task
object; this module only adapts them. Image columns stay undecoded until ``Task.doc``, which decodes
them with ``tokbench.images`` (strict, and downscaled to the model's ``max_pixels`` when given).

Names: ``vstar-synth`` = ``vstar_synth`` (tokbench's offline V*-like task, generated on first use into
``tokbench.synth.data_root()``; ``vstar-synth-hires`` is its V*-sized sibling for efficiency runs),
``vstar`` = lmms-eval's ``vstar_bench``; a name with ``-`` also matches its ``_`` spelling. A group or tag of exactly one task resolves to that task.

``data_dir`` points a task at a local copy of its data instead of the Hugging Face hub:

- ``vstar_synth``: a directory made by ``tokbench.synth.generate_vstar_synth`` (its ``test.parquet``),
  or the parquet file itself;
- a hub task: a directory written by ``datasets.DatasetDict.save_to_disk``; a hub snapshot directory
  (``hf download --repo-type dataset ...``: split-named parquet/json files, with the task's config
  name and ``data_files`` resolved inside it); or one ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv``
  / ``.arrow`` file holding the task's evaluation split (a parquet without the Hugging Face schema,
  whose images read back as ``{bytes, path}`` dicts, included).

Without ``data_dir``, a hub task loads from the hub or the ``datasets`` cache; offline, a snapshot in
the hub cache is read as if passed as ``data_dir``.

lmms-eval is imported only when a task is loaded (it takes seconds), and its loguru output and the
``datasets`` progress bars are silenced while tokbench calls into it.
"""

from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokbench.images import as_list, load_visuals, undecoded, undecoded_process_docs
from tokbench.task_data import TaskError, data_override, offline_source

if TYPE_CHECKING:
    import PIL.Image

TASKS_DIR = (Path(__file__).parent / "lmms_tasks").resolve()  # in a checkout: a link to tasks/
ALIASES = {"vstar-synth": "vstar_synth", "vstar-synth-hires": "vstar_synth_hires", "vstar": "vstar_bench"}
_LMMS_LOGGERS = ("lmms_eval", "utils")  # lmms-eval imports a task's !function file as module `utils`


class DocError(RuntimeError):
    """One document cannot be loaded (names the task, the doc and, where known, the file)."""


@dataclass
class Doc:
    doc_id: int
    images: list[PIL.Image.Image]  # RGB, loaded
    prompt: str  # lmms-eval doc_to_text, with the task's pre/post prompts
    target: str  # the reference answer as text (for the record)
    meta: dict = field(default_factory=dict)  # small scalar fields of the doc (category, bbox, question_id)


class Task:
    """One lmms-eval task's evaluation split (cut to ``limit`` docs)."""

    def __init__(self, name: str, lmms_task: Any, data: str, data_dir: Path | None = None, limit: int | None = None):
        self.name = name
        self.lmms_task = lmms_task
        self.data = data  # where the docs come from: a hub dataset id or a local path
        self.version = _version(lmms_task)
        self.gen_kwargs = dict(lmms_task.config.generation_kwargs or {})
        self._data_dir = data_dir
        self._docs, self._image_columns = undecoded(lmms_task.eval_docs)
        self._docs_no_media = getattr(lmms_task, "eval_docs_no_media", self._docs)
        self._len = len(self._docs) if limit is None else min(limit, len(self._docs))

    def __len__(self) -> int:
        return self._len

    @property
    def judged(self) -> bool:
        """Scored by an LLM judge after generation (YAML ``metadata.tokbench_judge``), not per document."""
        metadata = self.lmms_task.config.metadata
        entries = metadata if isinstance(metadata, list) else [metadata]
        return any(isinstance(e, dict) and e.get("tokbench_judge") for e in entries)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, version={self.version!r}, docs={self._len}, data={self.data!r})"

    def doc_ids(self) -> list[int]:
        return list(range(self._len))

    def doc(self, doc_id: int, max_pixels: int | None = None) -> Doc:
        """Load one document; a missing, truncated or undecodable image (``tokbench.images``), a
        decompression bomb, or a question that is empty once the task's pre/post prompts are taken off,
        raises ``DocError`` naming the doc (and the file).

        ``max_pixels``: the model's pixel budget (Qwen2.5-VL's ``max_pixels``); images larger than the
        model's target size are downscaled while decoding to a size with the same token grid
        (``tokbench.images.decode_image``). None: images at their stored size.
        """
        self._check(doc_id)
        task = self.lmms_task
        try:
            with _quiet():
                row = self._docs[doc_id]
                visuals = load_visuals(task.doc_to_visual, row, self._image_columns, max_pixels)
                prompt = task.doc_to_text(row)
                target = task.doc_to_target(row)
        except Exception as err:  # noqa: BLE001 - any failure becomes one message naming the doc
            raise DocError(f"task {self.name} doc {doc_id}{self._files(doc_id)}: {_one_line(err)}") from err
        kwargs = getattr(task.config, "lmms_eval_specific_kwargs", None) or {}
        core = str(prompt).removeprefix(kwargs.get("pre_prompt") or "").removesuffix(kwargs.get("post_prompt") or "")
        if not core.strip():
            raise DocError(f"task {self.name} doc {doc_id}: empty question")
        images = []
        for visual in visuals:
            if not hasattr(visual, "convert"):
                raise DocError(
                    f"task {self.name} doc {doc_id} gives a {type(visual).__name__} visual; tokbench handles images only"
                )
            images.append(visual if visual.mode == "RGB" else visual.convert("RGB"))
        if isinstance(target, list):
            target = " | ".join(str(t) for t in target)
        return Doc(doc_id, images, str(prompt), str(target), _small_fields(self._docs_no_media[doc_id]))

    def score(self, doc_id: int, prediction: str) -> dict[str, float]:
        """Score through the task's ``process_results``, as lmms-eval's evaluator calls it.

        Returns ``{"score": main metric, <metric>: value, ...}``: the main metric is the task's first
        ``metric_list`` entry; a per-sample value that is a dict (vstar, pope) contributes its
        ``score_key`` field (default ``score``). Values are as the task gives them (0/1 for exact match).
        Non-numeric values are left out, and ``score`` is absent when the main metric has none.
        """
        self._check(doc_id)
        task = self.lmms_task
        with _quiet():
            results = task.process_results(self._docs_no_media[doc_id], [prediction])
        key = getattr(task.config, "score_key", None) or "score"
        scores = {}
        for metric, value in results.items():
            if isinstance(value, dict):
                value = value.get(key)
            if isinstance(value, (bool, int, float)):
                scores[metric] = float(value)
        metrics = [m["metric"] for m in task.config.metric_list or [] if isinstance(m.get("metric"), str)]
        main = next((m for m in metrics if m in scores), next(iter(scores), None))
        return {"score": scores[main], **scores} if main is not None else scores

    def _check(self, doc_id: int) -> None:
        if not 0 <= doc_id < self._len:
            raise DocError(f"task {self.name} has no doc {doc_id} (it has {self._len}: 0..{self._len - 1})")

    def _files(self, doc_id: int) -> str:
        """' (image images/000003.png in /data/dir)' for the doc's image columns, when they hold paths."""
        try:
            row = self._docs[doc_id]
            paths = [(raw or {}).get("path") or "<embedded bytes>" for c in self._image_columns for raw in as_list(row[c])]
        except Exception:  # noqa: BLE001 - only decorates an error message
            return ""
        where = f" in {self._data_dir}" if self._data_dir else ""
        return f" (image {', '.join(map(str, paths))}{where})" if paths else ""


def task_names() -> list[str]:
    """tokbench's own tasks, the aliases, and a note that any lmms-eval task name works (no heavy import)."""
    own = sorted(_own_tasks())
    aliases = [f"{alias} = {target}" + ("" if target in own else " (lmms-eval)") for alias, target in ALIASES.items()]
    note = "any lmms-eval task name also works, e.g. vstar_bench, gqa, pope (python -m lmms_eval tasks lists them)"
    return own + aliases + [note]


def load_task(name: str, data_dir: str | None = None, limit: int | None = None) -> Task:
    """Resolve ``name`` (module docstring) and load its evaluation split through lmms-eval.

    Raises ``TaskError`` with one line: an unknown name lists close matches; a hub dataset that is not
    cached while the network is off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) names the ``hf download``
    to run and the ``--data-dir`` to pass; one that fails to load names the dataset and suggests ``--data-dir``.
    """
    canonical = _canonical(name)
    own = _own_tasks()
    manager = _task_manager(include_defaults=canonical not in own)
    if canonical not in manager.task_index and canonical.replace("-", "_") in manager.task_index:
        canonical = canonical.replace("-", "_")
    if canonical not in manager.task_index:
        raise TaskError(_unknown_message(name, list(manager.task_index)))
    canonical = _single_task(manager, canonical)
    entry = manager.task_index[canonical]
    config = _yaml_config(entry["yaml_path"])
    override, local_dir = data_override(canonical, config, data_dir)
    if not override and (snapshot := offline_source(canonical, config)) is not None:
        override, local_dir = data_override(canonical, config, str(snapshot))
    dataset = override.get("dataset_path") if override else config.get("dataset_path")
    try:
        with _quiet():
            if entry["type"] == "task":  # a YAML task: images stay undecoded until Task.doc
                hook = _yaml_config(entry["yaml_path"], mode="full").get("process_docs")
                override = {**override, "process_docs": partial(undecoded_process_docs, hook)}
            loaded = manager.load_config({"task": canonical, **override})
    except Exception as err:  # noqa: BLE001 - lmms-eval raises anything from datasets / tenacity / task utils
        err = _unwrap_retry(err)
        hint = "; pass --data-dir with a local copy" if not override else ""
        raise TaskError(f"task {canonical} could not load dataset {dataset}: {_one_line(err)}{hint}") from err
    lmms_task = loaded[canonical] if canonical in loaded else next(iter(loaded.values()))
    data = str(local_dir) if local_dir else str(dataset)
    return Task(canonical, lmms_task, data=data, data_dir=local_dir, limit=limit)


# --- name resolution -------------------------------------------------------------------------------


def _own_tasks() -> dict[str, Path]:
    """Task names declared in tasks/**/*.yaml (a text scan: no lmms-eval import)."""
    found = {}
    if TASKS_DIR.is_dir():
        for path in sorted(TASKS_DIR.rglob("*.yaml")):
            match = re.search(r"^task:\s*['\"]?([\w.-]+)['\"]?\s*$", path.read_text(), re.MULTILINE)
            if match:
                found[match.group(1)] = path
    return found


def _canonical(name: str) -> str:
    key = name.strip()
    key = ALIASES.get(key, key)
    own = _own_tasks()
    if key not in own and key.replace("-", "_") in own:
        key = key.replace("-", "_")
    return key


@lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """lmms-eval's TaskManager over tokbench's tasks/ (and lmms-eval's ~2000 tasks: about 3 s to index)."""
    with _quiet():
        from lmms_eval.tasks import TaskManager

        include = str(TASKS_DIR) if TASKS_DIR.is_dir() else None
        return TaskManager(verbosity="ERROR", include_path=include, include_defaults=include_defaults)


def _unknown_message(name: str, known: list[str]) -> str:
    ours = sorted(set(ALIASES) | set(_own_tasks()))
    names = sorted(set(known) | set(ours))
    key = name.strip()
    close = difflib.get_close_matches(key, ours, n=3, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(key, names, n=5, cutoff=0.6) if n not in close][: 5 - len(close)]
    if len(close) < 5 and len(key) >= 3:
        close += [n for n in names if key.lower() in n.lower() and n not in close][: 5 - len(close)]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown task {name!r}{hint} (tokbench list tasks; any lmms-eval task name works)"


def _single_task(manager, name: str) -> str:
    """A task name as is; a group or tag of one task → that task; larger groups are refused."""
    entry = manager.task_index[name]
    if entry["type"] in ("task", "python_task"):
        return name
    if entry["type"] == "tag":
        members = list(entry["task"])
    else:
        members = [t if isinstance(t, str) else t.get("task") for t in _yaml_config(entry["yaml_path"]).get("task", [])]
    if len(members) == 1 and isinstance(members[0], str) and members[0] in manager.task_index:
        return _single_task(manager, members[0])
    shown = ", ".join(str(m) for m in members[:6]) + (", ..." if len(members) > 6 else "")
    raise TaskError(f"task {name} is an lmms-eval {entry['type']} of {len(members)} tasks ({shown}); pass one of them")


def _yaml_config(yaml_path, mode: str = "simple") -> dict:
    """The task's YAML with includes resolved; ``!function`` left unimported (``mode="full"``: imported)."""
    from lmms_eval.utils import load_yaml_config

    if yaml_path in (None, -1):
        return {}
    return load_yaml_config(yaml_path, mode=mode)


# --- helpers ---------------------------------------------------------------------------------------


@contextmanager
def _quiet():
    """lmms-eval logs through loguru (DEBUG by default): mute it, the task hooks it imports (modules named
    ``utils``, e.g. vstar_bench's per-answer DEBUG lines) and datasets' bars inside the block."""
    from loguru import logger

    from tokbench.synth import quiet_datasets

    for name in _LMMS_LOGGERS:
        logger.disable(name)
    try:
        with quiet_datasets():
            yield
    finally:
        for name in _LMMS_LOGGERS:
            logger.enable(name)


def _version(lmms_task) -> str:
    """The YAML's ``metadata.version`` (a dict or, as in vstar_bench, a list of dicts), else lmms-eval's."""
    metadata = lmms_task.config.metadata
    entries = metadata if isinstance(metadata, list) else [metadata]
    for entry in entries:
        if isinstance(entry, dict) and "version" in entry:
            return str(entry["version"])
    return str(lmms_task.VERSION)


def _small_fields(row: dict) -> dict:
    """Scalar fields, short strings and small numeric lists (bbox) of a doc: what a record can carry."""

    def small(value, depth=0) -> bool:
        if value is None or isinstance(value, (bool, int, float)):
            return True
        if isinstance(value, str):
            return len(value) <= 300
        if isinstance(value, (list, tuple)) and depth < 2:
            return len(value) <= 64 and all(small(v, depth + 1) for v in value)
        return False

    return {k: v for k, v in row.items() if small(v)}


def _unwrap_retry(err: BaseException) -> BaseException:
    """lmms-eval's download is wrapped in tenacity.retry: report the last attempt's error."""
    last = getattr(err, "last_attempt", None)
    inner = last.exception() if last is not None else None
    return inner if inner is not None else err


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return message if len(message) <= 300 else message[:297] + "..."
