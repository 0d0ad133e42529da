"""tokbench/runlock.py: one process per run directory; the lock of a dead process is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tokbench.runlock import OWNER, RunLock, RunLockedError

_HOLD = """
import sys
from tokbench.runlock import RunLock
lock = RunLock(sys.argv[1])
lock.__enter__()
print("held", flush=True)
sys.stdin.read()
lock.__exit__(None, None, None)
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock until its stdin closes (or it is killed)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_the_owner_named(tmp_path):
    holder = hold(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError) as caught, RunLock(tmp_path / "run"):
            pass
    finally:
        holder.stdin.close()
        holder.wait()
    message = str(caught.value)
    assert f"in use by pid {holder.pid} on " in message and "--wait" in message and "\n" not in message
    with RunLock(tmp_path / "run"):  # released: free again
        pass
    assert not (tmp_path / "run" / OWNER).exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = hold(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / OWNER).exists()  # its owner file is left behind; the kernel dropped the lock
    with RunLock(tmp_path / "run"):
        assert f'"pid": {os.getpid()}' in (tmp_path / "run" / OWNER).read_text()


def test_wait_blocks_until_the_holder_finishes(tmp_path):
    holder = hold(tmp_path / "run")
    acquired = threading.Event()

    def waiter() -> None:
        with RunLock(tmp_path / "run", wait=True):
            acquired.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    assert not acquired.wait(0.5)  # still held by the other process
    holder.stdin.close()
    holder.wait()
    thread.join(60)
    assert acquired.is_set()


def test_lock_is_reentrant_within_a_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with RunLock(tmp_path / "run"):
        with RunLock(Path("run")):  # tokbench run holding it while it judges, the path spelt another way
            pass
        assert (tmp_path / "run" / OWNER).exists()
    assert not (tmp_path / "run" / OWNER).exists()


def test_soft_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    """Filesystems without flock: filelock's marker file outlives a killed holder; its pid names it dead."""
    import json
    import socket

    from filelock import SoftFileLock

    from tokbench import runlock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir.resolve() / runlock.LOCK
    monkeypatch.setitem(runlock._LOCKS, path, SoftFileLock(path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    path.write_text("")  # the marker a killed holder left behind
    owner = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then", "command": "tokbench run"}
    (run_dir / OWNER).write_text(json.dumps(owner))
    with RunLock(run_dir):
        assert json.loads((run_dir / OWNER).read_text())["pid"] == os.getpid()
    path.write_text("")  # a live holder (this test's own pid) is not taken over
    (run_dir / OWNER).write_text(json.dumps({**owner, "pid": os.getpid()}))
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"), RunLock(run_dir):
        pass
