"""Budgets, the method registry and argument handling (no model needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokbench.pruner import Budget, BudgetError, MethodError, build_method, get_method_class


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(value):
    with pytest.raises(BudgetError, match="outside"):
        Budget.ratio(value)


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_bad_count(value):
    with pytest.raises(BudgetError):
        Budget.tokens(value)


def test_budget_counts():
    assert Budget.ratio(0.25).count(576) == 144
    assert Budget.ratio(0.001).count(576) == 1
    assert Budget.tokens(64).count(576) == 64
    assert Budget.dynamic(0.5).count(576) is None
    with pytest.raises(BudgetError, match="exceeds the 576 visual tokens"):
        Budget.tokens(700).count(576)
    assert Budget.ratio(0.111).label() == "r0.111" and Budget.tokens(64).label() == "n64"


def test_registry_lists_baselines_without_importing_torch():
    code = "import sys, tokbench.pruner as p; print(p.method_names()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, torch_loaded = out.strip().splitlines()
    for name in ("full", "random", "fastv", "pool", "downsample"):
        assert name in names
    assert torch_loaded == "False"


def test_unknown_method_suggests_close_names():
    with pytest.raises(MethodError, match="did you mean fastv"):
        get_method_class("fastvv")


def test_method_args_are_typed_and_checked():
    method = build_method("fastv", Budget.ratio(0.5), {"k": "3"})
    assert method.k == 3 and method.name == "fastv"
    with pytest.raises(MethodError, match="does not accept argument 'layer'.*accepts: k"):
        build_method("fastv", Budget.ratio(0.5), {"layer": "3"})
    with pytest.raises(MethodError, match="not a valid"):
        build_method("fastv", Budget.ratio(0.5), {"k": "two"})
