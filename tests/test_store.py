"""tokbench/store.py: run ids, manifest, append/resume after a kill, reading runs back."""

from __future__ import annotations

import json
import os

import pytest

from tokbench import store as store_module
from tokbench.store import (
    SAMPLE_FIELDS,
    ConfigMismatchError,
    RunStore,
    environment_info,
    load_runs,
    make_run_id,
)

CONFIG = {"model": "Qwen/Qwen2.5-VL-3B", "method": "fastv", "budget_label": "r0.25", "task": "vstar",
          "method_args": {"k": "2"}, "limit": 10, "seed": 0, "dtype": "bfloat16"}  # fmt: skip


def _row(doc_id: int, **extra) -> dict:
    return {"run_id": "r", "model": "m", "method": "fastv", "budget": "r0.25", "task": "vstar",
            "doc_id": doc_id, "score": 1.0, "error": None, **extra}  # fmt: skip


def _opened(tmp_path, config=CONFIG) -> RunStore:
    store = RunStore(tmp_path, make_run_id(config))
    store.open(config)
    return store


def test_schema_fields_follow_design_order():
    assert SAMPLE_FIELDS[:6] == ("run_id", "model", "method", "budget", "task", "doc_id")
    assert SAMPLE_FIELDS[-3:] == ("peak_mem_source", "batch_size", "error")
    assert len(SAMPLE_FIELDS) == len(set(SAMPLE_FIELDS))
    from tokbench.records import SPANS

    assert {f"{s}_{kind}" for s in SPANS for kind in ("ms", "batch_ms")} <= set(SAMPLE_FIELDS)
    assert {"flops_ratio_llm", "flops_ratio_total", "nvml_peak_mb", "decode_batch_ms_per_token"} <= set(SAMPLE_FIELDS)


def test_run_id_is_readable_deterministic_and_config_sensitive():
    run_id = make_run_id(CONFIG)
    assert run_id.startswith("Qwen-Qwen2.5-VL-3B__fastv__r0.25__vstar__")
    assert len(run_id.rsplit("__", 1)[1]) == 8
    assert "/" not in run_id
    assert make_run_id(dict(reversed(list(CONFIG.items())))) == run_id
    assert make_run_id({**CONFIG, "seed": 1}) != run_id
    assert make_run_id({**CONFIG, "method_args": {"k": "3"}}) != run_id
    assert make_run_id({**CONFIG, "model": "/data/models/my model"}).startswith("my-model__")
    no_label = {k: v for k, v in CONFIG.items() if k != "budget_label"}
    assert make_run_id({**no_label, "budget": 64}).split("__")[2] == "n64"
    assert make_run_id({**no_label, "ratio": 0.5}).split("__")[2] == "r0.5"
    assert make_run_id(no_label).split("__")[2] == "full"


def test_open_writes_manifest_with_config_and_environment(tmp_path):
    store = _opened(tmp_path)
    manifest = json.loads(store.manifest_path.read_text())
    assert manifest["run_id"] == store.run_id == store.path.name
    assert manifest["config"] == CONFIG
    assert manifest["environment"]["torch"] and manifest["environment"]["python"]
    assert "created_at" in manifest


def test_environment_info():
    info = environment_info()
    keys = ("python", "torch", "transformers", "lmms_eval", "tokbench", "git_sha", "device", "hostname", "timestamp")
    assert set(keys) <= set(info)
    assert isinstance(info["device"], str) and info["device"]


def test_resume_after_truncated_last_line(tmp_path):
    store = _opened(tmp_path)
    store.append([_row(0), _row(1)])
    with open(store.samples_path, "a") as f:  # a kill in the middle of the next append
        f.write(json.dumps(_row(2))[:25])
    assert store.done_doc_ids() == {0, 1}  # readable before the repair too
    resumed = RunStore(tmp_path, store.run_id)
    resumed.open(CONFIG)
    assert resumed.done_doc_ids() == {0, 1}
    assert store.samples_path.read_text().endswith("}\n")  # the fragment is gone
    resumed.append([_row(2)])
    assert [r["doc_id"] for r in resumed.records()] == [0, 1, 2]
    assert len(json.loads(store.manifest_path.read_text())["resumed"]) == 1


def test_complete_last_line_without_newline_is_kept(tmp_path):
    store = _opened(tmp_path)
    store.append([_row(0)])
    store.samples_path.write_text(store.samples_path.read_text().rstrip("\n"))
    store.open(CONFIG)
    store.append([_row(1)])
    assert store.done_doc_ids() == {0, 1}


def test_corrupt_line_in_the_middle_raises(tmp_path):
    store = _opened(tmp_path)
    store.samples_path.write_text('{"doc_id": 0}\nnot json\n{"doc_id": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        store.records()


def test_config_mismatch_names_the_key(tmp_path):
    _opened(tmp_path)
    other = {**CONFIG, "limit": 20}
    with pytest.raises(ConfigMismatchError, match=r"limit: 10 before, 20 now.*another --output") as caught:
        RunStore(tmp_path, make_run_id(CONFIG)).open(other)
    assert "seed" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ConfigMismatchError, match="extra"):
        RunStore(tmp_path, make_run_id(CONFIG)).open({**CONFIG, "extra": True})


def test_same_config_with_tuples_resumes(tmp_path):
    config = {**CONFIG, "layers": (2, 4)}
    _opened(tmp_path, config)
    RunStore(tmp_path, make_run_id(config)).open(config)  # tuple vs. JSON list: not a mismatch


def test_append_fills_missing_fields_and_rejects_unknown_keys(tmp_path):
    store = _opened(tmp_path)
    store.append([_row(0, kept_index={"embed": [1, 3]})])
    (record,) = store.records()
    assert list(record)[: len(SAMPLE_FIELDS)] == list(SAMPLE_FIELDS)
    assert record["ttft_ms"] is None and record["kept_index"] == {"embed": [1, 3]}
    with pytest.raises(ValueError, match="bogus"):
        store.append([_row(1), _row(2, bogus=1)])
    with pytest.raises(ValueError, match="no doc_id"):
        store.append([{"score": 1.0}])
    assert store.done_doc_ids() == {0}  # nothing of a rejected batch was written


def test_append_converts_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    store = _opened(tmp_path)
    store.append([_row(0, n_visual=torch.tensor(64), kept_per_layer=torch.tensor([64, 32]))])
    assert store.records()[0]["kept_per_layer"] == [64, 32] and store.records()[0]["n_visual"] == 64


def test_update_manifest_is_atomic(tmp_path, monkeypatch):
    store = _opened(tmp_path)
    store.update_manifest(summary={"n": 2}, finished_at="now")
    before = store.manifest_path.read_text()
    assert json.loads(before)["summary"] == {"n": 2}

    with pytest.raises(TypeError):  # not serialisable: fails before any file is touched
        store.update_manifest(summary=object())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # fails after the temporary file was written
    with pytest.raises(OSError, match="disk full"):
        store.update_manifest(summary={"n": 3})
    monkeypatch.undo()
    assert store.manifest_path.read_text() == before
    assert sorted(p.name for p in store.path.iterdir()) == ["manifest.json"]
    with pytest.raises(ValueError, match="config"):
        store.update_manifest(config={})


def test_load_runs_from_run_dirs_and_parents(tmp_path):
    first = _opened(tmp_path)
    first.append([_row(0), _row(1, error="boom")])
    second_config = {**CONFIG, "method": "full", "budget_label": "r1"}
    second = _opened(tmp_path, second_config)
    second.append([{"doc_id": 0, "batch_size": 1, "error": "OSError: no image"}])  # an error row: labels unset

    frame = load_runs([tmp_path])
    assert len(frame) == 3
    assert set(SAMPLE_FIELDS) <= set(frame.columns) and "run_dir" in frame.columns
    errors = frame[frame["run_dir"] == str(second.path)]
    assert errors["method"].tolist() == ["full"] and errors["budget"].tolist() == ["r1"]
    assert errors["run_id"].tolist() == [second.run_id]
    assert errors["model"].tolist() == ["Qwen/Qwen2.5-VL-3B"]
    assert len(load_runs([first.path])) == 2
    assert len(load_runs([first.path, tmp_path])) == 3  # a run named twice is read once
    assert load_runs([]).empty
    with pytest.raises(FileNotFoundError, match="no runs"):
        (tmp_path / "empty").mkdir()
        load_runs([tmp_path / "empty"])


def test_git_sha_is_none_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "__file__", str(tmp_path / "tokbench" / "store.py"))
    assert store_module._git_sha() is None


def _enospc(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_mid_append_keeps_earlier_rows_and_names_the_file(tmp_path, monkeypatch):
    store = _opened(tmp_path)
    store.append([_row(0), _row(1)])
    before = store.samples_path.read_bytes()
    monkeypatch.setattr(store_module.os, "fsync", _enospc)  # the data reached the file, then the disk filled
    with pytest.raises(store_module.DiskFullError) as caught:
        store.append([_row(2), _row(3)])
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message and str(store.samples_path) in message
    assert "2 row(s) are saved" in message and "rerun the same command to resume" in message
    assert store.samples_path.read_bytes() == before  # no half batch left behind
    store.append([_row(2)])
    assert store.done_doc_ids() == {0, 1, 2}


def test_full_disk_on_the_manifest_names_the_resume_command(tmp_path, monkeypatch):
    store = _opened(tmp_path)
    judged = RunStore(tmp_path, store.run_id, resume=f"run: tokbench judge {store.path}")
    before = store.manifest_path.read_text()
    monkeypatch.setattr(store_module.os, "fsync", _enospc)
    with pytest.raises(store_module.DiskFullError, match=f"manifest.json .*tokbench judge {store.path} to resume"):
        judged.update_manifest(summary={"n": 1})
    monkeypatch.undo()
    assert store.manifest_path.read_text() == before


def test_output_dir_probe_refuses_a_full_disk(tmp_path, monkeypatch):
    store_module.probe_output_dir(tmp_path / "out")  # a disk with room: nothing left behind
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(store_module.os, "fsync", _enospc)
    with pytest.raises(store_module.DiskFullError, match=f"output dir {tmp_path / 'out'} .*--output DIR"):
        store_module.probe_output_dir(tmp_path / "out")
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_manifest_and_samples_follow_the_umask(tmp_path, umask):
    import stat

    store = _opened(tmp_path)
    os.chmod(store.manifest_path, 0o600)  # written by an older tokbench: the next write fixes it
    previous = os.umask(umask)
    try:
        store.open(CONFIG)
        store.append([_row(0)])
        store.replace_records(store.records())
        store.update_manifest(summary={"n": 1})
    finally:
        os.umask(previous)
    for path in (store.manifest_path, store.samples_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"config": {}}', "lacks run_id"),
        ('{"run_id": "r"}', "lacks config"),
        ("[1, 2]", "holds a JSON list"),
    ],
)
def test_unreadable_manifest_is_one_line_naming_the_file(tmp_path, text, message):
    store = _opened(tmp_path)
    store.manifest_path.write_text(text)
    for read in (store.read_manifest, lambda: store.open(CONFIG), lambda: store.update_manifest(summary={})):
        with pytest.raises(store_module.ManifestError, match=message) as caught:
            read()
        assert str(store.manifest_path) in str(caught.value) and "\n" not in str(caught.value)


def test_manifest_round_trip_keeps_unknown_keys(tmp_path):
    store = _opened(tmp_path)
    store.update_manifest(summary={"n": 1}, finished_at="now")
    manifest = store.read_manifest()
    assert manifest.summary == {"n": 1} and manifest.extra == {"finished_at": "now"}
    assert manifest.to_dict() == json.loads(store.manifest_path.read_text())


DATA = {"source": "/data/vstar", "docs": 10, "rows": 200, "fingerprint": "0123456789abcdef"}


@pytest.mark.parametrize(
    ("before", "now", "refused"),
    [
        (DATA, DATA, False),
        (DATA, {**DATA, "fingerprint": "fedcba9876543210"}, True),
        (DATA, {**DATA, "source": "/elsewhere"}, False),  # same rows moved: the same run
        (None, DATA, False),  # a manifest from before fingerprints: recorded now
    ],
)
def test_resume_over_changed_data_is_refused(tmp_path, before, now, refused):
    store = RunStore(tmp_path, make_run_id(CONFIG))
    store.open(CONFIG, data=before)
    store.append([_row(0)])
    again = RunStore(tmp_path, store.run_id)
    if refused:
        with pytest.raises(store_module.DataChangedError, match="changed since the run started.*another --output"):
            again.open(CONFIG, data=now)
    else:
        again.open(CONFIG, data=now)
        assert again.read_manifest().data == (before or now)
    assert again.done_doc_ids() == {0}
