"""Contract tests generated from the registries: every method x every model family's tiny model.

Each method must run through the engine, respect its budget, be deterministic, and report counts that
match what the decoder layers actually processed; and run from the CLI on vstar-synth.
"""

from __future__ import annotations

import pytest
from conftest import TINY_FAMILY_MODELS, layer_lengths, noise_image, tiny_adapter
from typer.testing import CliRunner

from tokbench.cli import app

from tokbench.engine import Engine
from tokbench.pruner import Budget, build_method, method_names

# Arguments a method needs to run offline on an untrained tiny model.
OFFLINE_ARGS = {
    "glimpseprune": {"allow_untrained": "true"},
    "cdpruner": {"relevance": "embeds"},
    "fastv": {"k": "1"},  # k=2 of 4 layers cannot average below 0.5
    "dart": {"k": "1"},  # likewise
}
FAMILIES = TINY_FAMILY_MODELS
RATIO = 0.4  # reachable by every schedule on 4-layer models (PyramidDrop needs > its first stage)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_within_budget_and_reports_true_counts(name, family):
    adapter = tiny_adapter(family)
    image, question = noise_image(448, 336, seed=3), "What colour is the small square?"
    method = build_method(name, Budget.ratio(RATIO), OFFLINE_ARGS.get(name))
    with layer_lengths(adapter) as lengths:
        out = Engine(adapter, method, record_kept=True).generate([[image]], [question], [0], 2)
    sample = out.samples[0]
    n = sample.n_visual
    assert 1 <= sample.n_kept_input <= n
    assert all(1 <= k <= n for k in sample.kept_per_layer)
    assert sample.kept_per_layer == sorted(sample.kept_per_layer, reverse=True)
    # the headline retention (the figure the method's budget is defined on) meets the budget
    headline = {
        "input": sample.n_kept_input,
        "final": sample.kept_per_layer[-1],
        "layer_avg": sum(sample.kept_per_layer) / len(sample.kept_per_layer),
    }[getattr(method, "headline_retention", "input")]
    if name != "full":
        assert headline / n <= RATIO + 1.5 / n + 0.02
    # counts are what the layers processed: text is constant, so differences in length are visual tokens
    text = [length - kept for length, kept in zip(lengths, sample.kept_per_layer)]
    glimpse = any(s.stage.value == "glimpse" for s in method.stages(adapter.info()))
    assert len(set(text)) == 1 or glimpse
    again = Engine(adapter, build_method(name, Budget.ratio(RATIO), OFFLINE_ARGS.get(name)), record_kept=True)
    assert again.generate([[image]], [question], [0], 2).samples[0].kept_index == sample.kept_index


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", [n for n in method_names() if n not in ("full", "downsample", "glimpseprune")])
def test_keep_everything_matches_full(name, family):
    """At ratio 1.0 a selection method keeps every token; the run must equal `full` exactly."""
    adapter = tiny_adapter(family)
    images, questions = [[noise_image(448, 336)]], ["Where is it?"]
    full = Engine(adapter, build_method("full", Budget.full())).generate(images, questions, [0], 4)
    try:
        method = build_method(name, Budget.ratio(1.0), OFFLINE_ARGS.get(name))
        out = Engine(adapter, method, position_policy="keep").generate(images, questions, [0], 4)
    except ValueError as err:  # methods whose schedule cannot express 1.0 must say so, not misbehave
        pytest.skip(f"{name}: {err}")
    if out.samples[0].n_kept_input == full.samples[0].n_visual and min(out.samples[0].kept_per_layer) == full.samples[0].n_visual:
        assert out.samples[0].tokens == full.samples[0].tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_from_the_cli_on_every_family(name, family, tmp_path):
    args = [arg for key, value in OFFLINE_ARGS.get(name, {}).items() for arg in ("--method-arg", f"{key}={value}")]
    result = CliRunner().invoke(app, ["run", "--method", name, "--model", family, "--task", "vstar-synth", "--limit", "2",
                                      "--batch-size", "2", "--ratio", str(RATIO), *args, "--output", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = [line for line in (run_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2 and '"error": null' in rows[0]
