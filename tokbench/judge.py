"""LLM judge for free-form answers: the Visual-CoT / GlimpsePrune protocol, any OpenAI-compatible endpoint.

Protocol (GlimpsePrune ``viscot_eval/cal_cot_score.py``, after Visual-CoT): a system prompt asks a
proof-reader to score the model's answer against the standard answer from 0 to 1 as ``score: <x>``;
the user turn is ``question / standard answer / model's answer``; temperature 0, up to 512 tokens. The
reply is lower-cased, must contain exactly one ``score: <number>``, and the number is clamped to
[0, 1]; anything else scores 0 and the raw reply is kept with the row.

Judges (``--judge``):

- an ``http(s)://`` URL: an OpenAI-compatible ``/v1`` endpoint (OpenAI, a local vLLM server, ...)
  with ``--judge-model``; the key is read from ``--judge-key-env`` (default ``OPENAI_API_KEY``; local
  servers need none). Calls run concurrently (bounded), each waits at most ``timeout`` seconds (60), and
  is retried with exponential backoff on connection errors, timeouts, 408/409/429 and 5xx: up to
  ``retries`` times per call (5) and ``retry_budget`` times in all per judging pass (10), so a judge
  that never answers costs minutes, not hours. Replies are cached on disk by (judge model, prompt), so
  judging the same answers again never calls the endpoint;
- ``exact``: normalised string equality (case, punctuation and spacing ignored), no model;
- ``local-hf:PATH``: a local Hugging Face causal LM (path or hub id) with a chat template, greedy.

A judge that is down or keeps failing leaves the remaining predictions unscored (``score`` null,
``judge_error`` set); ``tokbench judge RUN_DIR`` scores them later. So does a reply that is empty, has no
choices or is not JSON: that one row stays unscored with ``judge_error`` (never a score of 0). A rejected
API key stops judging with one line naming the variable to set. Ctrl-C stops judging at once (calls in
flight are abandoned), keeps every score obtained and raises ``JudgeInterrupted`` naming the command that
finishes the job. The manifest's ``judged_by`` counts the scored rows per judge.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import re
import string
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SYSTEM_PROMPT = (
    "\nYou are responsible for proofreading the answers, you need to give a score to the model's answer by "
    "referring to the standard answer, based on the given question. The full score is 1 point and the minimum "
    'score is 0 points. Please output the score in the form "score: <score>". The evaluation criteria require '
    "that the closer the model's answer is to the standard answer, the higher the score.\n"
)
USER_TEMPLATE = "\nquestion: {question}\nstandard answer: {answer}\nmodel's answer: {prediction}\n"
MAX_TOKENS = 512
TEMPERATURE = 0.0
_SCORE = re.compile(r"score: ([\d.]+)")


class JudgeError(RuntimeError):
    """The judge cannot be used at all (bad key, unknown model, bad spec): one line naming the fix."""


class JudgeUnavailable(RuntimeError):
    """One call failed after its retries (endpoint down, 5xx, 429): the item stays unscored.
    ``retriable``: whether another attempt may succeed (connection errors, timeouts, 429, 5xx)."""

    def __init__(self, message: str, retriable: bool = False):
        super().__init__(message)
        self.retriable = retriable


class JudgeReplyError(RuntimeError):
    """One reply cannot be read (empty, no choices, not JSON): that item stays unscored, the rest go on."""


class JudgeInterrupted(KeyboardInterrupt):
    """Ctrl-C while judging. ``verdicts``: what was judged so far (None where not yet); the message
    (from ``judge_run``) says how many rows were saved and the command that resumes."""

    def __init__(self, message: str, verdicts: list[Verdict | None]):
        super().__init__(message)
        self.verdicts = verdicts


def parse_score(reply: str | None) -> float:
    """The protocol's score in [0, 1] from a judge reply; 0.0 when absent, repeated or unparsable."""
    if not reply:
        return 0.0
    found = _SCORE.findall(reply.lower())
    if len(found) != 1:
        return 0.0
    try:
        value = float(found[0])
    except ValueError:
        return 0.0
    return min(1.0, max(0.0, value))


def user_prompt(question: str, answer: str, prediction: str) -> str:
    return USER_TEMPLATE.format(question=question, answer=answer, prediction=prediction)


class Judge(Protocol):
    """Scores one (question, reference, prediction); ``name`` is recorded with every score."""

    name: str

    def reply(self, question: str, answer: str, prediction: str) -> str:
        """The judge's raw reply (parsed by ``parse_score``); raises JudgeUnavailable / JudgeError."""
        ...


def _normalise(text: str) -> str:
    table = str.maketrans("", "", string.punctuation)
    return " ".join(text.lower().translate(table).split())


class ExactJudge:
    """Normalised exact match, replying in the protocol's format (no model, no cache)."""

    name = "exact"

    def reply(self, question: str, answer: str, prediction: str) -> str:
        return "score: 1.0" if _normalise(answer) == _normalise(prediction) else "score: 0.0"


class DiskCache:
    """Replies on disk, one JSON file per (judge model, prompt) key; writes are atomic."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(model: str, question: str, answer: str, prediction: str) -> str:
        payload = [model, SYSTEM_PROMPT, user_prompt(question, answer, prediction), TEMPERATURE, MAX_TOKENS]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, model: str, reply: str) -> None:
        from tokbench.store import write_atomically

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps({"model": model, "reply": reply}))


class CachedJudge:
    """Wraps a model judge with ``DiskCache``; ``calls`` counts replies that missed the cache."""

    def __init__(self, judge: Judge, model: str, cache: DiskCache):
        self.judge, self.model, self.cache = judge, model, cache
        self.name = judge.name
        self.calls = 0

    def reply(self, question: str, answer: str, prediction: str) -> str:
        key = self.cache.key(self.model, question, answer, prediction)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        text = self.judge.reply(question, answer, prediction)
        self.calls += 1
        try:
            self.cache.put(key, self.model, text)
        except OSError:  # a full or read-only cache costs a repeated call later, never the reply
            pass
        return text


class RetryBudget:
    """Retries left for a whole judging pass, shared by the concurrent calls (thread-safe)."""

    def __init__(self, total: int):
        self.left = total
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


_RETRY_STATUS = {408, 409, 429}  # and every 5xx, as the openai client retries


class OpenAIJudge:
    """Chat completions on an OpenAI-compatible endpoint (system + user turn, temperature 0)."""

    def __init__(
        self,
        url: str,
        model: str,
        key_env: str = "OPENAI_API_KEY",
        retries: int = 5,
        timeout: float = 60.0,
        retry_budget: int = 10,
    ):
        """``timeout``: seconds one request may take; ``retries``: retries of one call; ``retry_budget``:
        retries of all calls of this judge together (backoff 0.5 s doubling to 8 s, with jitter)."""
        from openai import OpenAI

        self.url, self.model, self.key_env = url, model, key_env
        self.name = f"{model}@{url}"
        self.retries, self.budget = retries, RetryBudget(retry_budget)
        self.client = OpenAI(base_url=url, api_key=os.environ.get(key_env) or "EMPTY", max_retries=0, timeout=timeout)

    def reply(self, question: str, answer: str, prediction: str) -> str:
        attempt = 0
        while True:
            try:
                return self._call(question, answer, prediction)
            except JudgeUnavailable as err:
                if not err.retriable or attempt >= self.retries or not self.budget.take():
                    raise
            time.sleep(min(8.0, 0.5 * 2**attempt) * random.uniform(0.75, 1.25))
            attempt += 1

    def _call(self, question: str, answer: str, prediction: str) -> str:
        """One request; raises JudgeError (stop judging), JudgeUnavailable (``.retriable`` set) or JudgeReplyError."""
        import openai

        try:
            completion = self.client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": user_prompt(question, answer, prediction)},
                ],
                max_tokens=MAX_TOKENS,
                temperature=TEMPERATURE,
            )
        except openai.AuthenticationError:
            raise JudgeError(
                f"judge at {self.url} rejected the API key (401); set ${self.key_env} to a valid key"
            ) from None
        except openai.NotFoundError:
            raise JudgeError(f"judge at {self.url} does not serve model {self.model!r}; check --judge-model") from None
        except (openai.APIConnectionError, openai.APIStatusError) as err:
            status = getattr(err, "status_code", None)
            retriable = status is None or status in _RETRY_STATUS or status >= 500
            raise JudgeUnavailable(f"judge at {self.url} failed: {_describe(err)}", retriable) from err
        except (openai.APIError, ValueError) as err:  # a 200 whose body is not the JSON it claims
            raise JudgeReplyError(f"judge at {self.url} sent an unreadable reply ({type(err).__name__})") from None
        return _content(completion, self.url)


def _content(completion: Any, url: str) -> str:
    """The first choice's text; JudgeReplyError for a non-JSON body, no choices or an empty text."""
    if isinstance(completion, str):  # the client hands back the raw text of a non-JSON body
        raise JudgeReplyError(f"judge at {url} sent a reply that is not JSON ({completion[:40]!r})")
    choices = getattr(completion, "choices", None)
    if not choices:
        raise JudgeReplyError(f"judge at {url} sent a reply without choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str) or not content.strip():
        raise JudgeReplyError(f"judge at {url} sent an empty reply")
    return content


def _describe(err: BaseException) -> str:
    import openai

    status = getattr(err, "status_code", None)
    if status:
        return f"HTTP {status}"
    return "no answer within the timeout" if isinstance(err, openai.APITimeoutError) else type(err).__name__


class LocalHFJudge:
    """A local causal LM (path or hub id) with a chat template, greedy decoding up to 512 tokens."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"local-hf:{path}"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path)
        except OSError as err:
            raise JudgeError(f"local judge {path!r} cannot be loaded ({str(err).splitlines()[0]}); pass a model directory") from None
        self.model.eval()

    def reply(self, question: str, answer: str, prediction: str) -> str:
        import torch

        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_prompt(question, answer, prediction)},
        ]
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class JudgeConfig:
    """What ``--judge`` and friends (or tokbench.toml's [judge] table) say."""

    judge: str | None = None  # URL | exact | local-hf:PATH
    model: str | None = None
    key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    retries: int = 5  # per call
    timeout: float = 60.0  # seconds per request
    retry_budget: int = 10  # retries of all calls of one judging pass together

    @classmethod
    def from_table(cls, table: dict[str, Any], **overrides: Any) -> JudgeConfig:
        """tokbench.toml's [judge] (keys url, model, key_env, concurrency, retries, timeout, retry_budget),
        then non-None overrides."""
        values = {"judge": table.get("url") or table.get("judge"), "model": table.get("model")}
        keys = ("key_env", "concurrency", "retries", "timeout", "retry_budget")
        values.update({k: table[k] for k in keys if k in table})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_judge(config: JudgeConfig) -> None:
    """Raise ``JudgeError`` (one line) for a judge spec that cannot work, without loading or calling it."""
    spec = (config.judge or "").strip()
    if config.concurrency < 1:
        raise JudgeError(f"judge concurrency {config.concurrency} must be >= 1")
    if not config.timeout > 0:
        raise JudgeError(f"judge timeout {config.timeout} must be > 0 seconds")
    if config.retries < 0 or config.retry_budget < 0:
        raise JudgeError(f"judge retries {config.retries} and retry budget {config.retry_budget} must be >= 0")
    if not spec:
        raise JudgeError("no judge given; pass --judge URL --judge-model NAME, --judge exact or --judge local-hf:PATH")
    if spec.startswith(("http://", "https://")):
        if not config.model:
            raise JudgeError(f"judge {spec} needs --judge-model (the model name the endpoint serves)")
    elif spec != "exact" and not (spec.startswith("local-hf:") and spec != "local-hf:"):
        raise JudgeError(f"unknown judge {spec!r}; use an http(s):// endpoint URL, exact or local-hf:PATH")


def build_judge(config: JudgeConfig, cache_root: Path | None = None) -> Judge:
    """The judge ``config`` names (``check_judge`` first); model judges are wrapped with the disk cache."""
    check_judge(config)
    spec = config.judge.strip()
    if spec == "exact":
        return ExactJudge()
    cache = DiskCache(cache_root or _cache_root())
    if spec.startswith("local-hf:"):
        path = spec.removeprefix("local-hf:")
        return CachedJudge(LocalHFJudge(path), f"local-hf:{path}", cache)
    judge = OpenAIJudge(spec, config.model, config.key_env, config.retries, config.timeout, config.retry_budget)
    return CachedJudge(judge, config.model, cache)


def _cache_root() -> Path:
    from tokbench.models.tiny import cache_root

    return cache_root() / "judge"


@dataclass
class Verdict:
    score: float | None
    reply: str | None
    error: str | None


def judge_items(
    judge: Judge,
    items: list[tuple[str, str, str]],
    concurrency: int = 8,
) -> list[Verdict]:
    """Judge (question, reference, prediction) items with at most ``concurrency`` calls in flight.

    After the first ``JudgeUnavailable`` no new call starts: the items not yet judged get that error
    (so a dead endpoint costs one item's retries, not all of them). A reply that cannot be read
    (``JudgeReplyError``, or any other failure of that one call) leaves that item unscored with the error.
    ``JudgeError`` propagates. Ctrl-C raises ``JudgeInterrupted`` at once with the verdicts so far: the
    workers are daemon threads, so calls still in flight neither delay it nor keep the process alive.
    """
    verdicts: list[Verdict | None] = [None] * len(items)
    failure: list[str] = []
    fatal: list[JudgeError] = []
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    finished: queue.SimpleQueue[int] = queue.SimpleQueue()
    stop = threading.Event()
    for index in range(len(items)):
        todo.put(index)

    def one(index: int) -> Verdict:
        if failure:
            return Verdict(None, None, failure[0])
        try:
            text = judge.reply(*items[index])
        except JudgeError as err:
            fatal.append(err)
            return Verdict(None, None, str(err))
        except JudgeUnavailable as err:
            failure.append(str(err))
            return Verdict(None, None, str(err))
        except Exception as err:  # noqa: BLE001 - one unreadable reply costs its row only
            message = str(err) if isinstance(err, JudgeReplyError) else f"{type(err).__name__}: {err}"
            return Verdict(None, None, message)
        return Verdict(parse_score(text), text, None)

    def worker() -> None:
        while not stop.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            verdicts[index] = one(index)
            finished.put(index)

    for _ in range(min(concurrency, len(items))):
        threading.Thread(target=worker, name="tokbench-judge", daemon=True).start()
    try:
        for _ in range(len(items)):
            while True:
                try:
                    finished.get(timeout=0.2)  # short waits keep the main thread responsive to Ctrl-C
                    break
                except queue.Empty:
                    continue
            if fatal:
                stop.set()
                raise fatal[0]
    except KeyboardInterrupt:
        stop.set()
        raise JudgeInterrupted("judging interrupted", list(verdicts)) from None
    return [v if v is not None else Verdict(None, None, "not judged") for v in verdicts]


@dataclass
class JudgeReport:
    judged: int  # rows scored in this pass
    pending: int  # rows of the run still unscored afterwards
    calls: int  # judge calls that missed the cache
    error: str | None  # why rows stayed unscored (endpoint down), if any


def judge_run(
    run_dir: Path, judge: Judge, concurrency: int = 8, force: bool = False, wait: bool = False
) -> JudgeReport:
    """Score a run's judged rows that have no score yet (all of them with ``force``), in place.

    A judged row carries ``question``, ``target``, ``prediction`` and a ``judge`` key. The samples file
    is replaced atomically and the manifest's summary and ``judged_by`` recomputed; rows that stay
    unscored keep ``score`` null and get ``judge_error``. The run directory is locked meanwhile
    (``RunLockedError`` if a run or another judge holds it; ``wait`` waits). On Ctrl-C the rows scored
    so far are saved, then ``JudgeInterrupted`` is raised with the command that resumes.
    """
    from tokbench.runlock import RunLock

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise JudgeError(f"{run_dir} is not a tokbench run directory (no manifest.json)")
    with RunLock(run_dir, wait=wait):
        return _judge_locked(run_dir, judge, concurrency, force)


def _judge_locked(run_dir: Path, judge: Judge, concurrency: int, force: bool) -> JudgeReport:
    from tokbench.store import RunStore

    store = RunStore(run_dir.parent, run_dir.name, resume=f"run: tokbench judge {run_dir}")
    rows = store.records()
    todo = [
        i for i, r in enumerate(rows)
        if "judge" in r and r.get("error") is None and (force or r.get("score") is None)
    ]  # fmt: skip
    calls_before = getattr(judge, "calls", 0)
    items = [(rows[i].get("question") or "", rows[i].get("target") or "", rows[i].get("prediction") or "") for i in todo]
    try:
        verdicts = judge_items(judge, items, concurrency)
    except JudgeInterrupted as interrupted:
        done = [(i, v) for i, v in zip(todo, interrupted.verdicts) if v is not None and v.score is not None]
        _save(store, rows, done, judge.name)
        raise JudgeInterrupted(
            f"judging interrupted; {len(done)} score(s) saved, {_unscored(rows)} row(s) unscored; "
            f"finish with: tokbench judge {run_dir}",
            interrupted.verdicts,
        ) from None
    _save(store, rows, list(zip(todo, verdicts)), judge.name)
    pending = _unscored(rows)
    errors = [v.error for v in verdicts if v.error]
    return JudgeReport(
        judged=sum(v.score is not None for v in verdicts),
        pending=pending,
        calls=getattr(judge, "calls", 0) - calls_before,
        error=errors[0] if errors else None,
    )


def _unscored(rows: list[dict[str, Any]]) -> int:
    """Judged rows (a ``judge`` key, no error) that have no score."""
    return sum(1 for r in rows if "judge" in r and r.get("error") is None and r.get("score") is None)


def _save(store, rows: list[dict[str, Any]], verdicts: list[tuple[int, Verdict]], name: str) -> None:
    """Write ``verdicts`` (row index, verdict) into ``rows``, the samples file and the manifest."""
    from tokbench.summary import summarize

    if not verdicts:
        return
    for i, verdict in verdicts:
        rows[i].update(score=verdict.score, judge=name, judge_reply=verdict.reply, judge_error=verdict.error)
    store.replace_records(rows)
    judged_by = Counter(r["judge"] for r in rows if r.get("judge") and r.get("score") is not None)
    store.update_manifest(summary=summarize(rows), judged_by=dict(sorted(judged_by.items())))
