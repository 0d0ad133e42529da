"""One process at a time per run directory: ``RunLock(run_dir)`` around everything that writes it.

The lock is ``RUN_DIR/.lock``, held with ``filelock`` (``flock``): the kernel drops it when its process
dies, so the lock of a killed run is taken over by the next one without any clean-up. (Where the
filesystem has no ``flock``, filelock falls back to a marker file; one left by a dead process of this
host is removed and taken over.) Who holds it
(pid, host, start time, command) is written beside it to ``RUN_DIR/.owner.json`` so that a refused run
can name it. A data-parallel run (``accelerate launch``) is one run: rank 0 takes the lock for all ranks.

Within one process the lock is re-entrant (``tokbench run`` holds it and then judges the run, which takes
it again).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

LOCK = ".lock"
OWNER = ".owner.json"


_LOCKS: dict[Path, object] = {}  # this process's FileLock per lock path


class RunLockedError(RuntimeError):
    """Another live process holds the run directory (one line naming it)."""


class RunLock:
    """Context manager: hold ``run_dir``'s lock; ``wait`` blocks until the holder finishes instead of refusing."""

    def __init__(self, run_dir: Path, wait: bool = False):
        self.run_dir = Path(run_dir)
        self.wait = wait
        self._lock = None

    def __enter__(self) -> RunLock:
        from filelock import FileLock, Timeout

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir.resolve() / LOCK
        if path not in _LOCKS:  # one FileLock per path and process, so that taking it again re-enters it
            _LOCKS[path] = FileLock(path)
        self._lock = _LOCKS[path]
        try:
            self._acquire()
        except Timeout:
            raise RunLockedError(
                f"{self.run_dir} is in use by {describe_owner(self.run_dir)}; wait for it to finish, "
                "or pass --wait to start when it does"
            ) from None
        if self._lock.lock_counter == 1:
            _write_owner(self.run_dir / OWNER)
        return self

    def _acquire(self) -> None:
        """Take the lock; a soft lock (filesystems without ``flock``: filelock falls back to a marker file
        that outlives a killed holder) left by a dead process on this host is removed and taken over."""
        from filelock import SoftFileLock, Timeout

        try:
            self._lock.acquire(timeout=-1 if self.wait else 0)
        except Timeout:
            if not (isinstance(self._lock, SoftFileLock) and _owner_is_dead(self.run_dir)):
                raise
            Path(self._lock.lock_file).unlink(missing_ok=True)
            self._lock.acquire(timeout=-1 if self.wait else 0)

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._lock.lock_counter == 1:
            (self.run_dir / OWNER).unlink(missing_ok=True)
        self._lock.release()


def describe_owner(run_dir: Path) -> str:
    """'pid 123 on host (since 2026-01-01T10:00:00+00:00: tokbench run ...)', or 'another process'."""
    owner = _read_owner(run_dir)
    if owner is None:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')}: {owner.get('command')})"


def _owner_is_dead(run_dir: Path) -> bool:
    """Whether the owner file names a process of this host that no longer exists."""
    owner = _read_owner(run_dir)
    if owner is None or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def _read_owner(run_dir: Path) -> dict | None:
    try:
        owner = json.loads((Path(run_dir) / OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _write_owner(path: Path) -> None:
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(owner) + "\n", encoding="utf-8")
    os.replace(tmp, path)
