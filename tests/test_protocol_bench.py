"""`tokbench bench --protocol glimpseprune-vstar` dry-runs on CPU with the tiny model: every method at the
protocol's settings, deviations printed, table/CSV/plot written, unreachable budgets skipped with their reason."""

from __future__ import annotations

import json

from tokbench.config import load_config
from tokbench.protocol import PROTOCOLS, ProtocolRun, default_methods, run_protocol


def test_protocol_dry_run_on_the_tiny_model(tmp_path):
    protocol = PROTOCOLS["glimpseprune-vstar"]
    plan = ProtocolRun(protocol, "tiny-qwen2.5-vl", False, ["full", "random", "visionzip", "fastv"], protocol.task,
                       limit=4, max_pixels=200704, output=str(tmp_path))  # fmt: skip
    config = plan.config("random")
    assert (config.ratio, config.batch_size, config.warmup) == (0.111, 4, 3)
    assert plan.config("full").ratio is None
    lines: list[str] = []
    result = run_protocol(plan, load_config().models, echo=lines.append)
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"full", "random", "visionzip"}
    assert "fastv" in result["skipped"] and "k=1" in result["skipped"]["fastv"]  # 0.111 unreachable on 4 layers
    for row in rows.values():
        assert row["n"] == 4 and row["n_errors"] == 0
        assert row["ttft_ms"] > 0 and row["kv_cache_mb"] > 0 and row["peak_mem_mb"] > 0
    assert rows["random"]["retention"] < 0.12 and rows["full"]["retention"] == 1.0
    assert rows["random"]["kv_cache_mb"] < rows["full"]["kv_cache_mb"]
    directory = result["directory"]
    table = (directory / "protocol.md").read_text()
    assert "Deviation: max_pixels 200704 (protocol: 3211264)" in table and "Deviation: limit 4" in table
    assert "TTFT / sample (ms)" in table and "fastv skipped" in table
    assert (directory / "protocol.png").stat().st_size > 0 and (directory / "protocol.csv").is_file()
    assert json.loads((directory / "settings.json").read_text())["protocol"]["batch_size"] == 4


def test_default_methods_are_every_registered_method_with_full_first():
    from tokbench.pruner import method_names

    methods = default_methods()
    assert methods[0] == "full" and sorted(methods) == sorted(method_names())
