"""LLM judge for free-form answers: the Visual-CoT / GlimpsePrune protocol, any OpenAI-compatible endpoint.

Protocol (GlimpsePrune ``viscot_eval/cal_cot_score.py``, after Visual-CoT): a system prompt asks a
proof-reader to score the model's answer against the standard answer from 0 to 1 as ``score: <x>``;
the user turn is ``question / standard answer / model's answer``; temperature 0, up to 512 tokens. The
reply is lower-cased, must contain exactly one ``score: <number>``, and the number is clamped to
[0, 1]; anything else scores 0 and the raw reply is kept with the row.

Judges (``--judge``):

- an ``http(s)://`` URL: an OpenAI-compatible ``/v1`` endpoint (OpenAI, a local vLLM server, ...)
  with ``--judge-model``; the key is read from ``--judge-key-env`` (default ``OPENAI_API_KEY``; local
  servers need none). Calls run concurrently (bounded), are retried with exponential backoff on
  connection errors, 429 and 5xx (the ``openai`` client's own retry), and are cached on disk by
  (judge model, prompt), so judging the same answers again never calls the endpoint;
- ``exact``: normalised string equality (case, punctuation and spacing ignored), no model;
- ``local-hf:PATH``: a local Hugging Face causal LM (path or hub id) with a chat template, greedy.

A judge that is down or keeps failing leaves the remaining predictions unscored (``score`` null,
``judge_error`` set); ``tokbench judge RUN_DIR`` scores them later. A rejected API key stops judging
with one line naming the variable to set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
    """One call failed after its retries (endpoint down, 5xx, 429): the item stays unscored."""


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
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"model": model, "reply": reply}, f)
        os.replace(tmp, path)


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
        self.cache.put(key, self.model, text)
        return text


class OpenAIJudge:
    """Chat completions on an OpenAI-compatible endpoint (system + user turn, temperature 0)."""

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", retries: int = 5, timeout: float = 120.0):
        from openai import OpenAI

        self.url, self.model, self.key_env = url, model, key_env
        self.name = f"{model}@{url}"
        self.client = OpenAI(
            base_url=url, api_key=os.environ.get(key_env) or "EMPTY", max_retries=retries, timeout=timeout
        )

    def reply(self, question: str, answer: str, prediction: str) -> str:
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
            raise JudgeUnavailable(f"judge at {self.url} failed: {_describe(err)}") from err
        content = completion.choices[0].message.content if completion.choices else None
        return content or ""


def _describe(err: BaseException) -> str:
    status = getattr(err, "status_code", None)
    return f"HTTP {status}" if status else type(err).__name__


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
    retries: int = 5

    @classmethod
    def from_table(cls, table: dict[str, Any], **overrides: Any) -> JudgeConfig:
        """tokbench.toml's [judge] (keys url, model, key_env, concurrency, retries), then non-None overrides."""
        values = {"judge": table.get("url") or table.get("judge"), "model": table.get("model")}
        values.update({k: table[k] for k in ("key_env", "concurrency", "retries") if k in table})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_judge(config: JudgeConfig) -> None:
    """Raise ``JudgeError`` (one line) for a judge spec that cannot work, without loading or calling it."""
    spec = (config.judge or "").strip()
    if config.concurrency < 1:
        raise JudgeError(f"judge concurrency {config.concurrency} must be >= 1")
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
    return CachedJudge(OpenAIJudge(spec, config.model, config.key_env, config.retries), config.model, cache)


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
    (so a dead endpoint costs one item's retries, not all of them). ``JudgeError`` propagates.
    """
    verdicts: list[Verdict | None] = [None] * len(items)
    failure: list[str] = []

    def one(index: int) -> None:
        if failure:
            verdicts[index] = Verdict(None, None, failure[0])
            return
        try:
            text = judge.reply(*items[index])
        except JudgeUnavailable as err:
            failure.append(str(err))
            verdicts[index] = Verdict(None, None, str(err))
            return
        verdicts[index] = Verdict(parse_score(text), text, None)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(one, i) for i in range(len(items))]:
            future.result()
    return [v if v is not None else Verdict(None, None, "not judged") for v in verdicts]


@dataclass
class JudgeReport:
    judged: int  # rows scored in this pass
    pending: int  # rows of the run still unscored afterwards
    calls: int  # judge calls that missed the cache
    error: str | None  # why rows stayed unscored (endpoint down), if any


def judge_run(run_dir: Path, judge: Judge, concurrency: int = 8, force: bool = False) -> JudgeReport:
    """Score a run's judged rows that have no score yet (all of them with ``force``), in place.

    A judged row carries ``question``, ``target``, ``prediction`` and a ``judge`` key. The samples file
    is replaced atomically and the manifest's summary recomputed; rows that stay unscored keep
    ``score`` null and get ``judge_error``.
    """
    from tokbench.store import RunStore
    from tokbench.summary import summarize

    run_dir = Path(run_dir)
    store = RunStore(run_dir.parent, run_dir.name)
    if not store.manifest_path.is_file():
        raise JudgeError(f"{run_dir} is not a tokbench run directory (no manifest.json)")
    rows = store.records()
    todo = [
        i for i, r in enumerate(rows)
        if "judge" in r and r.get("error") is None and (force or r.get("score") is None)
    ]  # fmt: skip
    calls_before = getattr(judge, "calls", 0)
    items = [(rows[i].get("question") or "", rows[i].get("target") or "", rows[i].get("prediction") or "") for i in todo]
    verdicts = judge_items(judge, items, concurrency)
    for i, verdict in zip(todo, verdicts):
        rows[i].update(score=verdict.score, judge=judge.name, judge_reply=verdict.reply, judge_error=verdict.error)
    if todo:
        store.replace_records(rows)
        store.update_manifest(summary=summarize(rows))
    pending = sum(1 for r in rows if "judge" in r and r.get("error") is None and r.get("score") is None)
    errors = [v.error for v in verdicts if v.error]
    return JudgeReport(
        judged=sum(v.score is not None for v in verdicts),
        pending=pending,
        calls=getattr(judge, "calls", 0) - calls_before,
        error=errors[0] if errors else None,
    )
