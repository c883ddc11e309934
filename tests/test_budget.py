"""Budget: absolute and relative limits, conjunction, resolution against an analysis, and the string grammar."""

from __future__ import annotations

import pytest
import torch
from models import ResidualNet

import fxmpq
from fxmpq import Budget, InfeasibleBudget, Policy


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
    with pytest.raises(InfeasibleBudget, match=r"'latency'.*bitops, size"):
        Budget(latency=3.0).resolve(analysis)


def test_negative_limit_rejected() -> None:
    with pytest.raises(InfeasibleBudget, match="bitops"):
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
    with pytest.raises(InfeasibleBudget):
        Budget.parse(text)


def test_uniform_on_unsupported_pair(analysis) -> None:
    with pytest.raises(InfeasibleBudget, match="W9A4"):
        Budget.uniform(9, 4).resolve(analysis)
