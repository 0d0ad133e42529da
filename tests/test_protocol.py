"""The `Pruner` protocol's optional members and `Budget | None` ("no budget given")."""

from __future__ import annotations

import pytest
import torch

from tokbench.pruner import (
    _REGISTRY,
    Budget,
    ModelInfo,
    Pruner,
    StageInputs,
    budget_count,
    budget_label,
    build_method,
    fixed_ratio,
    get_method_class,
    is_dynamic,
    method_names,
    plan_stages,
    register_method,
)

TINY_QWEN = ModelInfo("t", 4, 64, 4, 4, -1, (1, 3), 4, 32, position_rows=3)


@pytest.mark.parametrize("name", method_names())
def test_every_method_carries_the_optional_members(name):
    cls = get_method_class(name)
    assert cls.headline_retention in ("input", "final", "layer_avg")
    assert cls.position_policy in (None, "keep", "reindex")
    assert callable(cls.probe)


def test_a_plugin_without_optional_members_gets_the_protocol_defaults():
    class Plugin:  # not a Pruner subclass: only the required members
        version = "1"

        def __init__(self, budget):
            self.budget = budget

        def stages(self, model):
            return []

    try:
        cls = register_method("plugin-without-optionals")(Plugin)
        method = cls(None)
        assert (method.headline_retention, method.position_policy, method.probe(TINY_QWEN)) == ("input", None, None)
    finally:
        _REGISTRY.pop("plugin-without-optionals", None)


def test_subclassing_the_protocol_inherits_the_defaults_and_keeps_overrides():
    fastv = get_method_class("fastv")
    assert Pruner in fastv.__mro__ and fastv.headline_retention == "layer_avg"
    assert fastv.probe is Pruner.probe and fastv.position_policy is None
    glimpse = get_method_class("glimpseprune")
    assert glimpse.position_policy == "keep" and glimpse.probe is not Pruner.probe


def test_no_budget_is_none_and_keeps_everything():
    assert budget_count(None, 64) == 64 and budget_count(Budget.ratio(0.25), 64) == 16
    assert budget_label(None) == "r1" == budget_label(Budget.full())  # run ids made before stay valid
    assert fixed_ratio(None) == 1.0 and fixed_ratio(Budget.tokens(8)) is None and fixed_ratio(Budget.ratio(0.3)) == 0.3
    assert is_dynamic(Budget.dynamic()) and not is_dynamic(None) and not is_dynamic(Budget.full())


@pytest.mark.parametrize("name", ["full", "random", "pool", "fastv", "pyramiddrop", "vscan", "divprune", "cdpruner"])
def test_methods_accept_no_budget_and_keep_every_token(name):
    args = {"cdpruner": {"relevance": "embeds"}}.get(name, {})
    method = build_method(name, None, args)
    n = 64
    inputs = StageInputs(n, n, [(8, 8)], torch.zeros(n, 2, dtype=torch.long), budget_count(method.budget, n))
    for spec in plan_stages(method, TINY_QWEN):
        assert method.stage_count(spec, inputs) == n


def test_pyramiddrop_lam_needs_no_budget_and_refuses_one():
    assert len(plan_stages(build_method("pyramiddrop", None, {"lam": "0.5"}), TINY_QWEN)) == 3
    with pytest.raises(ValueError, match="not both"):
        plan_stages(build_method("pyramiddrop", Budget.ratio(0.5), {"lam": "0.5"}), TINY_QWEN)


def test_no_budget_keeps_the_manifest_and_run_id_of_a_full_budget():
    from tokbench.pruner import method_config

    assert method_config(build_method("random", None)) == method_config(build_method("random", Budget.full()))
