"""Packaging: a wheel carries the bundled lmms-eval tasks and tokbench.toml, and builds without warnings."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_install_runs_the_demo_outside_the_checkout(tmp_path):
    """What `.ci/run` checks: `tokbench run ... --task vstar-synth` from an installed wheel in an empty dir."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(ROOT / ".ci" / "wheel-check")], cwd=tmp_path, env={**env, "PY": sys.executable, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "wheel check: the installed wheel ran vstar-synth" in done.stdout


def test_wheel_builds_without_setuptools_deprecations(tmp_path):
    code = "import sys, setuptools.build_meta as b; b.build_wheel(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Deprecat" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    (wheel,) = tmp_path.glob("tokbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tokbench/tokbench.toml" in names
    assert "tokbench/lmms_tasks/vstar_synth/vstar_synth.yaml" in names
    assert "tokbench/lmms_tasks/visual_cot/placeholder_visual_cot_gqa.jsonl" in names
