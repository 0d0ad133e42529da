"""Synthetic offline datasets in lmms-eval format, generated on demand into a cache directory."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def data_root() -> Path:
    """Where generated datasets live: ``$TOKBENCH_DATA`` or ``~/.cache/tokbench/data``."""
    return Path(os.environ.get("TOKBENCH_DATA") or Path.home() / ".cache" / "tokbench" / "data").expanduser()


@contextmanager
def quiet_datasets():
    """Silence ``datasets`` progress bars and info logs inside the block, restoring them after."""
    import datasets

    bars = not datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


from tokbench.synth.vstar import ensure_vstar_synth, generate_vstar_synth  # noqa: E402

__all__ = ["data_root", "ensure_vstar_synth", "generate_vstar_synth", "quiet_datasets"]
