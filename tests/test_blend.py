"""fxmpq.blend_indicators: sources scaled to the same objective range and summed; mismatches refused by name."""

from __future__ import annotations

import pytest

import fxmpq
from fxmpq import ArgumentError, Indicators
from fxmpq.errors import IndicatorError


def _ind(w: dict, a: dict, source: str) -> Indicators:
    return Indicators(layers=tuple(w), bits=(2, 4, 8), weight=w, act=a, meta={"source": source})


A = _ind({"l1": {2: 4.5, 4: 2.5, 8: 0.5}, "l2": {2: 2.5, 4: 1.5, 8: 0.5}},
         {"l1": {2: 1.25, 4: 0.75, 8: 0.25}, "l2": {2: 1.25, 4: 0.75, 8: 0.25}}, "a")
# the same ranking as A's weights in another unit (x100), activations reversed in importance
B = _ind({"l1": {2: 450.0, 4: 250.0, 8: 50.0}, "l2": {2: 250.0, 4: 150.0, 8: 50.0}},
         {"l1": {2: 15.0, 4: 10.0, 8: 5.0}, "l2": {2: 350.0, 4: 200.0, 8: 50.0}}, "b")


def test_each_source_counts_by_its_range_not_its_unit() -> None:
    out = fxmpq.blend_indicators([(A, 2.0), (B, 1.0)])
    span_a = 2 * (4 + 2) + (1 + 1)  # alpha 2 on the weights
    span_b = (400 + 200) + (10 + 300)
    assert out.weight["l1"][2] == pytest.approx(2 * 4.5 / span_a + 450.0 / span_b)
    assert out.act["l2"][4] == pytest.approx(0.75 / span_a + 200.0 / span_b)
    assert out.weight["l2"][8] == pytest.approx(2 * 0.5 / span_a + 50.0 / span_b)
    # the blend's objective of any policy is the sum of the sources' objectives, each over its span
    def obj(ind, alpha, pol):
        return sum(alpha * ind.weight[n][pol[n][0]] + ind.act[n][pol[n][1]] for n in ind.layers)
    pol = {"l1": (4, 2), "l2": (2, 8)}
    assert obj(out, 1.0, pol) == pytest.approx(obj(A, 2.0, pol) / span_a + obj(B, 1.0, pol) / span_b)
    assert "a (alpha 2" in out.meta["method"] and "b (alpha 1" in out.meta["method"]
    assert Indicators.from_json(out.to_json()) == out


def test_rows_are_repaired_before_scaling() -> None:
    bumpy = _ind({"l1": {2: 1.0, 4: 2.0, 8: 0.5}, "l2": {2: 2.0, 4: 1.0, 8: 0.5}},
                 {"l1": {2: 1.0, 4: 0.5, 8: 0.25}, "l2": {2: 1.0, 4: 0.5, 8: 0.25}}, "bumpy")
    out = fxmpq.blend_indicators([(bumpy, 1.0), (A, 1.0)])
    assert out.weight["l1"][2] >= out.weight["l1"][4]  # the source's 1 < 2 was pooled, not kept


def test_bad_sources_are_refused_by_name() -> None:
    with pytest.raises(ArgumentError, match="at least two"):
        fxmpq.blend_indicators([(A, 2.0)])
    with pytest.raises(ArgumentError, match="source 1's alpha must be a number > 0"):
        fxmpq.blend_indicators([(A, 2.0), (B, 0)])
    with pytest.raises(ArgumentError, match=r"source 1 must be an \(Indicators, alpha\) pair"):
        fxmpq.blend_indicators([(A, 2.0), B])
    other = _ind({"l1": A.weight["l1"], "l3": A.weight["l2"]}, {"l1": A.act["l1"], "l3": A.act["l2"]}, "other")
    with pytest.raises(IndicatorError, match="first difference: l3"):
        fxmpq.blend_indicators([(A, 2.0), (other, 1.0)])
    flat = _ind({"l1": {2: 1.0, 4: 1.0, 8: 1.0}, "l2": {2: 1.0, 4: 1.0, 8: 1.0}},
                {"l1": {2: 1.0, 4: 1.0, 8: 1.0}, "l2": {2: 1.0, 4: 1.0, 8: 1.0}}, "flat")
    with pytest.raises(IndicatorError, match="source 1 \\(flat\\) has every row flat"):
        fxmpq.blend_indicators([(A, 2.0), (flat, 1.0)])
