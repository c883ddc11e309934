"""Budget: absolute and relative limits, conjunction, resolution against an analysis, and the string grammar."""

from __future__ import annotations

import pytest
import torch
from models import ResidualNet

import fxmpq
from fxmpq import Budget, BudgetError, FxmpqError, InfeasibleBudget, Policy


@pytest.fixture(scope="module")
def analysis() -> fxmpq.Analysis:
    return fxmpq.analyze(ResidualNet(), torch.randn(1, 3, 16, 16))


def test_absolute_limits(analysis) -> None:
    assert Budget(bitops=9.7e9).resolve(analysis) == {"bitops": 9.7e9}
    assert Budget(size=1000, bitops=5).resolve(analysis) == {"size": 1000.0, "bitops": 5.0}


def test_uniform_is_whole_model_cost_with_pins(analysis) -> None:
    expected = analysis.cost(Policy.uniform(analysis, 3, 4))["bitops"]
    assert Budget.uniform(3, 4).resolve(analysis) == {"bitops": pytest.approx(expected)}
    # pinned layers count at their pins: differs from "all layers at W3A4"
    all_w3a4 = sum(m.macs * 3 * 4 for m in analysis.layers)
    assert expected != pytest.approx(all_w3a4)


def test_compression(analysis) -> None:
    fp32 = analysis.fp32_cost()["size"]
    assert Budget.compression(12.2).resolve(analysis)["size"] == pytest.approx(fp32 / 12.2)


def test_conjunction_keeps_every_limit_and_the_tightest(analysis) -> None:
    b = Budget.uniform(3, 4) & Budget.compression(12.2) & Budget(bitops=1.0)
    r = b.resolve(analysis)
    assert set(r) == {"bitops", "size"}
    assert r["bitops"] == 1.0  # tighter than uniform W3A4
    assert (Budget(size=5) & Budget(size=3)).resolve(analysis) == {"size": 3.0}
    assert set(b.metrics) == {"bitops", "size"}


def test_frozen() -> None:
    b = Budget(bitops=1.0)
    with pytest.raises(AttributeError):
        b.absolute = {}  # type: ignore[misc]


def test_unknown_metric_names_it_and_the_hardware_metrics(analysis) -> None:
    with pytest.raises(BudgetError, match=r"'latency'.*bitops, size"):
        Budget(latency=3.0).resolve(analysis)


def test_negative_limit_rejected() -> None:
    with pytest.raises(BudgetError, match="bitops"):
        Budget(bitops=-1)


@pytest.mark.parametrize(("text", "expected"), [
    ("bitops<=9.7e9", {"bitops": 9.7e9}),
    ("bitops<=9.7G", {"bitops": 9.7e9}),
    ("size<=4MB", {"size": 4e6 * 8}),
    ("size<=1KiB & bitops<=2k", {"size": 1024 * 8, "bitops": 2000.0}),
])
def test_parse_absolute(analysis, text, expected) -> None:
    assert Budget.parse(text).resolve(analysis) == pytest.approx(expected)


def test_parse_relative(analysis) -> None:
    assert Budget.parse("w3a4").resolve(analysis) == Budget.uniform(3, 4).resolve(analysis)
    assert Budget.parse("W3A4&c12.2").resolve(analysis) == (Budget.uniform(3, 4)
                                                             & Budget.compression(12.2)).resolve(analysis)


@pytest.mark.parametrize("text", ["", "w3", "c", "bitops<9", "bitops<=3parsecs", "&"])
def test_parse_errors(text) -> None:
    with pytest.raises(BudgetError) as e:
        Budget.parse(text)
    assert not isinstance(e.value, InfeasibleBudget)  # malformed, not infeasible


def test_uniform_on_unsupported_pair(analysis) -> None:
    with pytest.raises(BudgetError, match="W9A4"):
        Budget.uniform(9, 4).resolve(analysis)


def test_budget_error_classes() -> None:
    assert issubclass(BudgetError, FxmpqError) and issubclass(BudgetError, ValueError)
    assert issubclass(InfeasibleBudget, BudgetError)  # `except InfeasibleBudget` still sees only infeasibility
    assert not issubclass(BudgetError, InfeasibleBudget)


def test_coerce(analysis) -> None:
    b = Budget.uniform(3, 4)
    assert Budget.coerce(b) is b
    assert Budget.coerce("w3a4&c12.2").resolve(analysis) == (b & Budget.compression(12.2)).resolve(analysis)
    assert Budget.coerce({"bitops": 5, "size": 7.0}).resolve(analysis) == {"bitops": 5.0, "size": 7.0}
    with pytest.raises(BudgetError, match=r"budget must be a Budget, a budget string .* found float"):
        Budget.coerce(3.5)
    with pytest.raises(BudgetError, match="budget dict keys must be metric names"):
        Budget.coerce({1: 2.0})
    with pytest.raises(BudgetError, match="bitops"):
        Budget.coerce({"bitops": "many"})
    with pytest.raises(BudgetError, match="cannot read term"):
        Budget.coerce("w3a4&x")
