"""The one weak-dominance filter against its O(n^2) definition (hypothesis), alone and per group."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fxmpq.core import dominance
from fxmpq.core.dominance import nondominated, nondominated_within


def _brute(pts: np.ndarray) -> list[int]:
    """Row i is kept unless some row j weakly dominates it (pts[j] <= pts[i] everywhere), strictly or as an
    earlier copy of an equal row: of equal rows the first is kept."""
    n = len(pts)
    keep = []
    for i in range(n):
        beaten = any(np.all(pts[j] <= pts[i]) and (np.any(pts[j] < pts[i]) or j < i) for j in range(n) if j != i)
        if not beaten:
            keep.append(i)
    return keep


# few distinct values: many ties and equal rows, the cases a filter gets wrong
_tables = st.integers(1, 6).flatmap(lambda d: arrays(np.float64, st.tuples(st.integers(0, 40), st.just(d)),
                                                     elements=st.integers(0, 4).map(float)))


@settings(max_examples=300, deadline=None)
@given(pts=_tables)
def test_nondominated_matches_the_definition(pts) -> None:
    assert nondominated(pts).tolist() == _brute(pts)


@settings(max_examples=50, deadline=None)
@given(pts=_tables)
def test_general_case_in_small_blocks(pts) -> None:
    """The more-than-three-column path compares in blocks; blocks of one row give the same set."""
    saved = dominance._BLOCK_CELLS
    dominance._BLOCK_CELLS = 1
    try:
        assert nondominated(pts).tolist() == _brute(pts)
    finally:
        dominance._BLOCK_CELLS = saved


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_nondominated_within_groups(data) -> None:
    d = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(0, 30))
    keys = np.array(data.draw(st.lists(st.integers(0, 3), min_size=d * n, max_size=d * n)), dtype=float).reshape(d, n)
    groups = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.int64)
    keep = nondominated_within(groups, keys)
    expected = np.zeros(n, dtype=bool)
    for g in np.unique(groups):
        cols = np.flatnonzero(groups == g)
        expected[cols[_brute(keys[:, cols].T)]] = True
    assert keep.tolist() == expected.tolist()


def test_float_rows_and_large_tables() -> None:
    rng = np.random.default_rng(0)
    for d in (2, 3, 4):
        pts = rng.random((300, d))
        assert nondominated(pts).tolist() == _brute(pts)
