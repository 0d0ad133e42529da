"""Peak memory grows linearly with the visual-token count for every vision-stage and in-LLM method (no
n x n map anywhere), measured on a narrow Qwen2.5-VL with the real vision-tower depth."""

from __future__ import annotations

import pytest

from tokbench import memory_scaling

COUNTS = (1024, 2048)  # merged visual tokens; 4096 and 8192 patches through the 32-block tower


@pytest.fixture(scope="module")
def deep():
    return memory_scaling.deep_tower_qwen(max(COUNTS))


METHODS = ["dart", "fastv", "glimpseprune", "pyramiddrop", "sparsevlm", "visionzip", "vispruner", "vscan"]


def test_every_vision_and_llm_stage_method_is_measured(deep):
    """The list below is every registered method with a vision, glimpse or LLM stage: a new one must join it."""
    names = memory_scaling.scaling_methods(deep)
    assert sorted(names) == METHODS
    assert "divprune" not in names  # embed stage: pairwise by design


@pytest.mark.parametrize("name", ["full", *METHODS])
def test_peak_memory_grows_linearly(deep, name):
    method = memory_scaling._build(name, deep)
    peaks = {n: memory_scaling.peak_mb(deep, method, n) for n in COUNTS}
    assert peaks[COUNTS[0]] > 1.0
    assert memory_scaling.growth(peaks) < 2.25, peaks  # an n x n term would push a doubling towards 4x


def test_growth_flags_a_quadratic_term():
    assert memory_scaling.growth({1024: 10.0, 2048: 20.0, 4096: 40.0}) == pytest.approx(2.0)
    assert memory_scaling.growth({1024: 10.0, 2048: 20.0, 4096: 80.0}) == pytest.approx(4.0)


def test_bench_memory_cli_on_a_named_model_and_its_bad_usage():
    from typer.testing import CliRunner

    from tokbench.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--memory", "--model", "tiny-qwen2.5-vl", "--tokens", "64,128"])
    assert result.exit_code == 0, result.output
    assert "x per 2x n" in result.output and "glimpseprune" in result.output
    refused = runner.invoke(app, ["bench", "--memory", "--model", "tiny-qwen2.5-vl", "--random-weights", "--tokens", "64"])
    assert refused.exit_code == 2 and "no shipped config" in refused.output
    assert runner.invoke(app, ["bench", "--memory", "--tokens", "8"]).exit_code == 2
