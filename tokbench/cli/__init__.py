"""The `tokbench` command (entry point ``tokbench.cli:app``; ``python -m tokbench``).

One module per command group, each with a ``register(app)``: ``run`` (run, sweep), ``listing`` (list,
show), ``results`` (report, regress, plot, html), ``judge``, ``train`` (train-canary, train-glimpse),
``bench``. They share ``common`` (console, one-line errors, interrupts, options) and ``build`` (the
RunConfig builder of run and sweep); imports go one way: this module → groups → common.

Exit codes: 0 success; 1 the job failed (or ``regress`` found a regression, or predictions were left
unjudged); 2 bad usage (one line, no traceback unless ``--debug``); 3 the run finished but some samples
failed; 130 / 143 interrupted by SIGINT / SIGTERM (rerun the same command to resume).
"""

from __future__ import annotations

from tokbench.cli import bench, judge, listing, results, run, train
from tokbench.cli.common import make_app

app = make_app()
for _group in (run, listing, judge, results, train, bench):
    _group.register(app)

__all__ = ["app"]
