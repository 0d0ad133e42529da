"""The LLM judge: protocol parsing, the fake OpenAI-compatible server end to end, cache, outages, bad keys."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from fake_judge import FakeJudge, closed_port_url
from typer.testing import CliRunner

from tokbench.cli import app
from tokbench.judge import (
    DiskCache,
    ExactJudge,
    JudgeConfig,
    JudgeError,
    build_judge,
    judge_items,
    judge_run,
    parse_score,
)

runner = CliRunner()


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("score: 0.8", 0.8),
        ("Score: 1", 1.0),
        ("The answer is right.\nscore: 1.0", 1.0),
        ("score: 3", 1.0),  # clamped
        ("score: 0.5 ... on reflection score: 0.7", 0.0),  # ambiguous
        ("score: .", 0.0),
        ("score:0.9", 0.0),  # the protocol's pattern needs the space
        ("no verdict", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_parse_score_follows_the_protocol(reply, score):
    assert parse_score(reply) == score


def test_exact_judge_ignores_case_punctuation_and_spacing():
    judge = ExactJudge()
    assert parse_score(judge.reply("q", "The small square is red.", "the small  square is red")) == 1.0
    assert parse_score(judge.reply("q", "red", "blue")) == 0.0


@pytest.mark.parametrize("spec", ["ftp://x", "local-hf:", "gpt-4"])
def test_bad_judge_specs_are_one_line_errors(spec):
    with pytest.raises(JudgeError, match="unknown judge"):
        build_judge(JudgeConfig(judge=spec, model="m"))
    with pytest.raises(JudgeError, match="--judge-model"):
        build_judge(JudgeConfig(judge="http://127.0.0.1:1/v1"))


def test_judge_items_bounded_concurrency_and_cache(tmp_path):
    with FakeJudge() as server:
        judge = build_judge(JudgeConfig(judge=server.url, model="fake", concurrency=3), cache_root=tmp_path)
        items = [("q", "red", "red"), ("q", "red", "blue"), ("q", "a", "b"), ("q", "x", "x")]
        verdicts = judge_items(judge, items, concurrency=3)
        assert [v.score for v in verdicts] == [1.0, 0.25, 0.25, 1.0]
        assert server.calls == 4
        again = judge_items(judge, items, concurrency=3)
        assert [v.score for v in again] == [1.0, 0.25, 0.25, 1.0] and server.calls == 4  # all from the cache
        system = server.requests[0]["messages"][0]
        assert system["role"] == "system" and 'score: <score>' in system["content"]
        assert server.requests[0]["temperature"] == 0 and server.requests[0]["max_tokens"] == 512
    assert len(list(DiskCache(tmp_path).root.rglob("*.json"))) == 4


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """One generation run of the offline Visual-CoT twin without a judge: predictions saved, unscored."""
    out = tmp_path_factory.mktemp("viscot")
    result = runner.invoke(app, ["run", "--method", "random", "--ratio", "0.5", "--task", "visual-cot-synth",
                                 "--limit", "4", "--max-new-tokens", "4", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "not judged" in result.output
    (run_dir,) = out.iterdir()
    rows = _rows(run_dir)
    assert len(rows) == 4 and all(r["score"] is None and "judge" in r for r in rows)
    assert {r["subset"] for r in rows} == {"shapes"} and all(r["question"].startswith("What") for r in rows)
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def _config(tmp_path: Path, retries: int) -> str:
    path = tmp_path / "judge.toml"
    path.write_text(f"[judge]\nretries = {retries}\n")
    return str(path)


def test_judge_command_scores_and_second_pass_is_free(predictions, tmp_path):
    model = f"fake-{uuid.uuid4().hex}"  # a fresh cache key
    with FakeJudge() as server:
        run_dir = _copy(predictions, tmp_path)
        result = runner.invoke(app, ["judge", str(run_dir), "--judge", server.url, "--judge-model", model])
        assert result.exit_code == 0, result.output
        rows = _rows(run_dir)
        first = server.calls  # identical prompts judged at the same time may both call
        assert len({(r["question"], r["target"], r["prediction"]) for r in rows}) <= first <= 4
        assert all(r["score"] == 0.25 and r["judge"] == f"{model}@{server.url}" for r in rows)
        assert all("score: 0.25" in r["judge_reply"] for r in rows)
        summary = json.loads((run_dir / "manifest.json").read_text())["summary"]
        assert summary["accuracy"] == 0.25 and summary["n_unscored"] == 0
        again = _copy(predictions, tmp_path / "again")
        result = runner.invoke(app, ["judge", str(again), "--judge", server.url, "--judge-model", model])
        assert result.exit_code == 0 and server.calls == first  # every reply came from the disk cache
        assert [r["score"] for r in _rows(again)] == [0.25] * 4


def test_garbage_reply_scores_zero_and_keeps_the_text(predictions, tmp_path):
    with FakeJudge(mode="garbage") as server:
        run_dir = _copy(predictions, tmp_path)
        result = runner.invoke(app, ["judge", str(run_dir), "--judge", server.url, "--judge-model", uuid.uuid4().hex])
        assert result.exit_code == 0, result.output
        assert all(r["score"] == 0.0 and r["judge_reply"] == "I would rather not grade this." for r in _rows(run_dir))


def test_server_errors_are_retried_until_it_recovers(predictions, tmp_path):
    with FakeJudge(fail_first=3) as server:
        run_dir = _copy(predictions, tmp_path)
        args = ["judge", str(run_dir), "--judge", server.url, "--judge-model", uuid.uuid4().hex,
                "--judge-concurrency", "1", "--config", _config(tmp_path, retries=4)]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        distinct = {(r["question"], r["target"], r["prediction"]) for r in _rows(run_dir)}
        assert server.calls == 3 + len(distinct)  # 3 failures retried, then one call per distinct prompt
        assert [r["score"] for r in _rows(run_dir)] == [0.25] * 4


def test_judge_down_keeps_predictions_and_judge_finishes_later(tmp_path):
    model = uuid.uuid4().hex
    out = tmp_path / "runs"
    args = ["run", "--method", "full", "--task", "visual-cot-synth", "--limit", "3", "--max-new-tokens", "4",
            "-o", str(out), "--judge", closed_port_url(), "--judge-model", model,
            "--config", _config(tmp_path, retries=0)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "3 prediction(s) saved but not judged" in result.output and "tokbench judge" in result.output
    (run_dir,) = out.iterdir()
    rows = _rows(run_dir)
    assert len(rows) == 3 and all(r["prediction"] is not None and r["score"] is None for r in rows)
    assert all(r["judge_error"] for r in rows)
    with FakeJudge() as server:
        result = runner.invoke(app, ["judge", str(run_dir), "--judge", server.url])  # model from the manifest
        assert result.exit_code == 0, result.output
    rows = _rows(run_dir)
    assert all(r["score"] is not None and r["judge_error"] is None for r in rows)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in _rows(run_dir)]


def test_rejected_key_is_one_clear_line(predictions, tmp_path):
    with FakeJudge(status=401) as server:
        run_dir = _copy(predictions, tmp_path)
        args = ["judge", str(run_dir), "--judge", server.url, "--judge-model", "m", "--judge-key-env", "MY_JUDGE_KEY"]
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "rejected the API key (401); set $MY_JUDGE_KEY" in result.output
    assert all(r["score"] is None for r in _rows(run_dir))


def test_local_hf_judge_replies_and_unparsable_text_scores_zero(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokbench.models.tiny import qwen_processor

    processor, ids = qwen_processor()
    tokenizer = processor.tokenizer
    tokenizer.chat_template = processor.chat_template
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]))  # fmt: skip
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    judge = build_judge(JudgeConfig(judge=f"local-hf:{tmp_path / 'judge'}"), cache_root=tmp_path / "cache")
    reply = judge.reply("What colour?", "red", "blue")
    assert isinstance(reply, str) and judge.calls == 1
    assert parse_score(reply) == 0.0  # a random model does not write "score: x"
    assert judge.reply("What colour?", "red", "blue") == reply and judge.calls == 1  # cached


def test_missing_local_judge_is_a_usage_error(tmp_path):
    with pytest.raises(JudgeError, match="cannot be loaded"):
        build_judge(JudgeConfig(judge=f"local-hf:{tmp_path / 'nothing'}"))


@pytest.mark.parametrize(
    ("mode", "judge_error"),
    [
        ("empty", "sent an empty reply"),
        ("no_choices", "sent a reply without choices"),
        ("not_json", "sent a reply that is not JSON"),
        ("bad_json", "sent an unreadable reply (JSONDecodeError)"),
    ],
)
def test_unreadable_replies_leave_rows_unscored_not_zero(predictions, tmp_path, mode, judge_error):
    with FakeJudge(mode=mode) as server:
        run_dir = _copy(predictions, tmp_path)
        result = runner.invoke(app, ["judge", str(run_dir), "--judge", server.url, "--judge-model", uuid.uuid4().hex])
    assert result.exit_code == 1, result.output
    assert "4 prediction(s) saved but not judged" in result.output and "Traceback" not in result.output
    rows = _rows(run_dir)
    assert len(rows) == 4 and all(r["score"] is None and judge_error in r["judge_error"] for r in rows)
    assert not list(tmp_path.rglob("judge/**/*.json"))  # nothing unreadable was cached


def test_a_judge_that_never_answers_costs_the_timeout_and_the_retry_budget(predictions, tmp_path):
    with FakeJudge(mode="hang") as server:
        run_dir = _copy(predictions, tmp_path)
        config = JudgeConfig(judge=server.url, model=uuid.uuid4().hex, timeout=0.3, retries=5, retry_budget=1)
        report = judge_run(run_dir, build_judge(config, cache_root=tmp_path / "cache"), concurrency=1)
        calls = server.calls
    assert calls == 2  # one call, one retry from the budget of 1, then no new call starts
    assert report.judged == 0 and report.pending == 4 and "no answer within the timeout" in report.error
    rows = _rows(run_dir)
    assert all(r["score"] is None and "no answer within the timeout" in r["judge_error"] for r in rows)


@pytest.mark.parametrize(("key", "value"), [("timeout", 0), ("retry_budget", -1)])
def test_bad_timeout_or_budget_is_a_usage_error(key, value):
    with pytest.raises(JudgeError, match=key.replace("_", " ")):
        build_judge(JudgeConfig(judge="http://127.0.0.1:1/v1", model="m", **{key: value}))


_INTERRUPTIBLE = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when the test runs as a background job
from tokbench.judge import JudgeConfig, JudgeInterrupted, build_judge, judge_run
run_dir, url, cache = sys.argv[1:]
judge = build_judge(JudgeConfig(judge=url, model="m-" + cache[-8:], timeout=600), cache_root=cache)
try:
    judge_run(run_dir, judge, concurrency=1)
except JudgeInterrupted as err:
    print(err, flush=True)
    sys.exit(130)
"""


def test_ctrl_c_stops_judging_at_once_and_keeps_the_scores(predictions, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = _copy(predictions, tmp_path)
    with FakeJudge(mode="hang", answer_first=1) as server:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTIBLE, str(run_dir), server.url, str(tmp_path / "cache")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        while server.calls < 2 and proc.poll() is None:  # the second call hangs (600 s timeout)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)  # a guard: without the fix this waits 600 s and more
    assert proc.returncode == 130, stderr
    assert f"finish with: tokbench judge {run_dir}" in stdout and "Traceback" not in stderr
    rows = _rows(run_dir)
    scored = [r for r in rows if r["score"] is not None]
    assert len(rows) == 4 and 1 <= len(scored) < 4 and all(r["score"] == 0.25 for r in scored)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["summary"]["n_unscored"] == 4 - len(scored)
    assert sum(manifest["judged_by"].values()) == len(scored)


def test_manifest_names_the_judge_that_scored_the_rows(predictions, tmp_path):
    with FakeJudge() as server:
        run_dir = _copy(predictions, tmp_path)
        first, second = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
        assert runner.invoke(app, ["judge", str(run_dir), "--judge", server.url, "--judge-model", first]).exit_code == 0
        assert json.loads((run_dir / "manifest.json").read_text())["judged_by"] == {f"{first}@{server.url}": 4}
        result = runner.invoke(app, ["judge", str(run_dir), "--judge", server.url, "--judge-model", second, "--force"])
        assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "manifest.json").read_text())["judged_by"] == {f"{second}@{server.url}": 4}


def test_judged_samples_keep_the_umask_mode(predictions, tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        run_dir = _copy(predictions, tmp_path)
        result = runner.invoke(app, ["judge", str(run_dir), "--judge", "exact"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((run_dir / "samples.jsonl").stat().st_mode) == 0o644
    assert stat.S_IMODE((run_dir / "manifest.json").stat().st_mode) == 0o644


def test_cached_replies_keep_the_umask_mode(tmp_path):
    import os
    import stat

    cache = DiskCache(tmp_path)
    previous = os.umask(0o027)
    try:
        cache.put(cache.key("m", "q", "a", "p"), "m", "score: 1")
    finally:
        os.umask(previous)
    (path,) = tmp_path.rglob("*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and cache.get(cache.key("m", "q", "a", "p")) == "score: 1"
