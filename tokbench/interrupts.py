"""Ctrl-C (SIGINT) and SIGTERM end a command with one line and exit 130 / 143, never a traceback.

Standard library only, so ``python -m tokbench`` installs it before importing the CLI. Inside
``handled()`` both signals raise ``Interrupted`` (a KeyboardInterrupt); whatever that turns into on its
way out (a library may wrap it in its own error), the block ends with the one line of ``message()``
and ``SystemExit(130 | 143)``. Blocks nest: the outermost resets the state, the innermost reports.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
# signal: the one received; reported: its line was printed; saved: where finished work lies; depth: nesting
STATE: dict[str, Any] = {"signal": None, "reported": False, "saved": None, "depth": 0}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    STATE["signal"] = signum
    raise Interrupted(signum)


def message() -> str:
    """One line: which signal, what was kept, and that the same command resumes."""
    name = signal.Signals(STATE["signal"] or signal.SIGINT).name
    saved = f"finished batches are saved under {STATE['saved']}" if STATE["saved"] else "finished work is kept"
    return f"interrupted ({name}); {saved}. Rerun the same command to resume."


def _exit_code(error: BaseException) -> Any:
    """The exit code a SystemExit or click/typer Exit carries (None for other exceptions)."""
    if isinstance(error, SystemExit):
        return error.code or 0
    return getattr(error, "exit_code", None)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Run the block with SIGINT/SIGTERM raising ``Interrupted``; an interrupt ends it with one line."""
    if STATE["depth"] == 0:
        STATE.update(signal=None, reported=False, saved=None)
    main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, _raise) for signum in EXIT_CODES} if main else {}
    STATE["depth"] += 1
    try:
        yield
    except BaseException as error:
        interrupted = STATE["signal"] is not None or isinstance(error, KeyboardInterrupt)
        if not interrupted or STATE["reported"] or _exit_code(error) == 0:
            raise
        STATE["signal"] = STATE["signal"] or signal.SIGINT
        STATE["reported"] = True
        print(message(), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODES[STATE["signal"]]) from None
    finally:
        STATE["depth"] -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
