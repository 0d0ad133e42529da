"""tokbench/fingerprint.py: the data fingerprint follows the evaluated rows, not file times."""

from __future__ import annotations

import os

import pytest

from tokbench.fingerprint import data_fingerprint
from tokbench.tasks import load_task


@pytest.fixture(scope="module")
def rows():
    import datasets

    from tokbench.synth import ensure_vstar_synth

    return datasets.Dataset.from_parquet(str(ensure_vstar_synth() / "test.parquet")).select(range(4))


def _write(rows, path, last_label=None):
    if last_label is not None:
        rows = rows.map(lambda row, i: {"label": last_label if i == len(rows) - 1 else row["label"]}, with_indices=True)
    path.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(str(path / "test.parquet"))
    return str(path)


def test_fingerprint_changes_with_the_rows_not_the_file_times(rows, tmp_path):
    data = _write(rows, tmp_path / "d")
    first = data_fingerprint(load_task("vstar-synth", data_dir=data))
    assert first["docs"] == first["rows"] == 4 and len(first["fingerprint"]) == 16 and first["source"] == data
    os.utime(tmp_path / "d" / "test.parquet", (1, 1))  # touched: same rows
    assert data_fingerprint(load_task("vstar-synth", data_dir=data)) == first
    _write(rows, tmp_path / "d", last_label="Z")  # the last target swapped
    assert data_fingerprint(load_task("vstar-synth", data_dir=data))["fingerprint"] != first["fingerprint"]
    limited = data_fingerprint(load_task("vstar-synth", data_dir=data, limit=3))  # only rows 0-2 are evaluated
    _write(rows, tmp_path / "d")
    assert data_fingerprint(load_task("vstar-synth", data_dir=data, limit=3)) == limited
