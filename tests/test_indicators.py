"""Indicators: cleaning (the paper's prohibitive price, isotonic repair), the Cleaning enum, the table."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxmpq import ArgumentError, Cleaning, Indicators
from fxmpq.policy_search.indicators import _pav_decreasing


def _ind() -> Indicators:
    return Indicators(layers=("a", "b"), bits=(2, 4, 8),
                      weight={"a": {2: 0.1, 4: 0.5, 8: 0.05}, "b": {2: 0.9, 4: 0.5, 8: 0.1}},
                      act={"a": {2: 0.3, 4: 0.2, 8: 0.1}, "b": {2: 0.2, 4: 0.2, 8: 0.4}})


def test_pav_decreasing() -> None:
    out = _pav_decreasing(np.array([0.1, 0.5, 0.05]))
    assert np.all(np.diff(out) <= 1e-15)
    assert out.sum() == pytest.approx(0.65)


@settings(max_examples=100, deadline=None)
@given(y=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=8))
def test_pav_is_the_closest_non_increasing_fit(y) -> None:
    y = np.array(y)
    out = _pav_decreasing(y)
    assert np.all(np.diff(out) <= 1e-12) and out.sum() == pytest.approx(y.sum())
    if np.all(np.diff(y) <= 0):
        assert out == pytest.approx(y)  # already monotone: unchanged


def test_paper_cleaning_prices_a_step_below_the_next_higher_bits() -> None:
    ind = _ind()
    cleaned, pw, pa = ind.cleaned(Cleaning.PAPER)
    assert cleaned is ind  # the rows stay as they are
    assert pw == {"a": frozenset({2}), "b": frozenset()}
    assert pa == {"a": frozenset(), "b": frozenset({4})}  # equal steps (2 and 4 bits) are not a violation


def test_isotonic_cleaning_repairs_rows_and_prices_nothing() -> None:
    ind = _ind()
    cleaned, pw, pa = ind.cleaned("isotonic")
    assert set(pw.values()) == set(pa.values()) == {frozenset()}
    for table, orig in ((cleaned.weight, ind.weight), (cleaned.act, ind.act)):
        for n, row in table.items():
            vals = [row[b] for b in sorted(row)]
            assert all(x >= y - 1e-15 for x, y in itertools.pairwise(vals))
            assert sum(vals) == pytest.approx(sum(orig[n].values()))
    assert cleaned.weight["b"] == ind.weight["b"]  # a monotone row is left alone


def test_cleaning_enum_and_its_strings() -> None:
    assert Cleaning.coerce("paper") is Cleaning.PAPER and Cleaning.coerce(Cleaning.ISOTONIC) is Cleaning.ISOTONIC
    assert Cleaning.PAPER == "paper"  # a StrEnum: the old strings still compare equal
    for bad in ("monotone", 3, None):
        with pytest.raises(ArgumentError, match=r"clean=.*expected one of paper, isotonic"):
            Cleaning.coerce(bad)
        with pytest.raises(ArgumentError):
            _ind().cleaned(bad)


def test_table_aligns_columns() -> None:
    lines = _ind().table().splitlines()
    assert lines[0].split() == ["layer", "w@8", "w@4", "w@2", "a@8", "a@4", "a@2"]
    assert set(lines[1]) == {"-"} and len({len(x) for x in lines}) == 1
    assert lines[2].split()[:2] == ["a", "0.05"]
