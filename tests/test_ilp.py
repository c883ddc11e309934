"""fxmpq.policy_search.ilp: the HiGHS boundary against brute force on tiny multiple-choice knapsacks, and its status mapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxmpq.policy_search import ilp


def _mckp(cost: np.ndarray, weight: np.ndarray, groups: list[list[int]], cap: float):
    n = len(cost)
    eq = ilp.Rows(np.cumsum([0] + [len(g) for g in groups]), np.concatenate(groups), np.ones(n))
    kn = ilp.Rows(np.array([0, n]), np.arange(n), weight)
    rows = ilp.Rows.stack([eq, kn])
    lo = np.concatenate([np.ones(len(groups)), [-np.inf]])
    hi = np.concatenate([np.ones(len(groups)), [cap]])
    return rows, lo, hi


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(2, 4), st.data())
def test_mip_matches_brute_force(n_groups: int, per: int, data) -> None:
    n = n_groups * per
    cost = np.array(data.draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)), dtype=float)
    weight = np.array(data.draw(st.lists(st.integers(1, 30), min_size=n, max_size=n)), dtype=float)
    groups = [list(range(g * per, (g + 1) * per)) for g in range(n_groups)]
    cap = float(data.draw(st.integers(n_groups, 30 * n_groups)))
    rows, lo, hi = _mckp(cost, weight, groups, cap)
    sol = ilp.solve(cost, rows, lo, hi)
    best = None
    for combo in itertools.product(*groups):
        if weight[list(combo)].sum() <= cap:
            v = cost[list(combo)].sum()
            best = v if best is None else min(best, v)
    if best is None:
        assert sol.status is ilp.Status.INFEASIBLE
        assert sol.x is None
    else:
        assert sol.status is ilp.Status.OPTIMAL
        assert sol.objective == pytest.approx(best, abs=1e-9)
        chosen = np.flatnonzero(sol.x > 0.5)
        assert weight[chosen].sum() <= cap  # checked here, not trusted from the solver
        assert all(len(set(chosen) & set(g)) == 1 for g in groups)
        assert sol.gap == pytest.approx(0.0, abs=1e-9)


def test_lp_relaxation_returns_duals_and_lower_bound() -> None:
    cost = np.array([1.0, 3.0, 0.0, 2.0])
    weight = np.array([4.0, 1.0, 5.0, 1.0])
    rows, lo, hi = _mckp(cost, weight, [[0, 1], [2, 3]], cap=4.0)
    lp = ilp.solve(cost, rows, lo, hi, col_upper=np.inf, integral=False)
    mip = ilp.solve(cost, rows, lo, hi)
    assert lp.status is ilp.Status.OPTIMAL and mip.status is ilp.Status.OPTIMAL
    assert lp.row_dual is not None and len(lp.row_dual) == 3
    assert lp.objective <= mip.objective + 1e-9
    # weights (0,2)=9, (0,3)=5, (1,2)=6, (1,3)=2: only columns 1 and 3 fit the capacity 4, cost 3 + 2
    assert mip.objective == pytest.approx(5.0)
    assert list(np.flatnonzero(mip.x > 0.5)) == [1, 3]


def test_infeasible_status() -> None:
    cost = np.array([1.0, 2.0])
    rows, lo, hi = _mckp(cost, np.array([5.0, 6.0]), [[0, 1]], cap=1.0)
    sol = ilp.solve(cost, rows, lo, hi)
    assert sol.status is ilp.Status.INFEASIBLE
    assert sol.x is None


def test_start_solution_and_bad_option() -> None:
    cost = np.array([1.0, 2.0, 0.5, 0.7])
    rows, lo, hi = _mckp(cost, np.array([1.0, 1.0, 3.0, 1.0]), [[0, 1], [2, 3]], cap=2.0)
    sol = ilp.solve(cost, rows, lo, hi, start=np.array([0.0, 1.0, 0.0, 1.0]))
    assert sol.status is ilp.Status.OPTIMAL
    assert sol.objective == pytest.approx(1.7)
    bad = ilp.solve(cost, rows, lo, hi, options={"no_such_option": 1})
    assert bad.status is ilp.Status.ERROR and "no_such_option" in bad.message
