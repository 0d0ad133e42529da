"""Every `tokbench ...` command in a code block of README.md and docs/*.md works as written.

The cheap ones run through CliRunner on the tiny offline models, in document order (a sweep before the
report that reads it), deduplicated, with ``--limit 1`` forced on run/sweep and the working directory a
temporary folder (so ``--output results/...`` and the paths read back land there). Commands that need
what CI lacks are in SKIP with the reason; a SKIP rule that no longer matches any command fails, so the
list cannot rot.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from tokbench.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

SKIP = [  # (regex on the command line, why it cannot run here)
    (r"qwen2\.5-vl-[37]b|llava-1\.5-(7|13)b|qwen3-vl-[248]b|internvl3-[128]b|72B", "a real model: hub weights or a GPU-sized random-weights run"),
    (r"--task (vstar|visual_cot\w*|gqa)\b(?!-)", "the real dataset (network or a local copy)"),
    (r"--judge https?://", "a judge endpoint"),
    (r"\$\w", "a shell loop variable"),
    (r"<\w+>|\bPATH\b|\.\.\.", "a placeholder the reader fills in"),
    (r"\*", "a shell glob over the runs of the loop above it"),
    (r"results/masks", "reads the runs of the (skipped) loop above it"),
    (r"train-canary|train-glimpse", "minutes of training (tests/test_canary.py, tests/test_train_glimpse.py run it small)"),
    (r"photo\.png", "an image the reader supplies"),
]


def doc_commands() -> list[tuple[str, list[str]]]:
    """(file, argv without the leading `tokbench`) for each command line in a fenced code block (not ```text
    blocks, which show output), deduplicated."""
    found: dict[tuple[str, ...], str] = {}
    for path in DOCS:
        for lang, block in re.findall(r"```([\w-]*)\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL):
            if lang == "text":  # printed output, not commands
                continue
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                if line.startswith("tokbench "):
                    argv = shlex.split(line, comments=True)[1:]
                    found.setdefault(tuple(argv), path.relative_to(ROOT).as_posix())
    return [(source, list(argv)) for argv, source in found.items()]


def skip_reason(argv: list[str]) -> str | None:
    line = shlex.join(argv)
    return next((why for pattern, why in SKIP if re.search(pattern, line)), None)


def cheap(argv: list[str]) -> list[str]:
    """``--limit 1`` on run and sweep (replacing the documented limit); ``bench --memory`` at small token counts."""
    if argv[0] == "bench" and "--tokens" in argv:
        at = argv.index("--tokens") + 1
        return [*argv[:at], "256,512", *argv[at + 1 :]]
    if argv[0] not in ("run", "sweep"):
        return argv
    out, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--limit":
            skip_next = True
        else:
            out.append(arg)
    return [*out, "--limit", "1"]


def test_extractor_finds_the_documented_commands():
    commands = [" ".join(argv) for _, argv in doc_commands()]
    assert any(c.startswith("sweep --methods random,pool") for c in commands)
    assert any(c.startswith("list methods") for c in commands) and any(c.startswith("bench ") for c in commands)


def test_every_skip_rule_is_used():
    reasons = {skip_reason(argv) for _, argv in doc_commands()}
    assert [why for _, why in SKIP if why not in reasons] == []


def test_documented_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner, failures, ran = CliRunner(), [], 0
    for source, argv in doc_commands():
        if skip_reason(argv):
            continue
        result = runner.invoke(app, cheap(argv))
        ran += 1
        if result.exit_code != 0:
            failures.append(f"{source}: tokbench {shlex.join(argv)} → exit {result.exit_code}: {result.output[-400:]}")
    assert ran >= 8 and failures == [], "\n".join(failures)
