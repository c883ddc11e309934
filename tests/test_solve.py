"""The solver (fxmpq.policy_search.solve): brute force on random instances, feasibility re-checked, DP and HiGHS agree, plain HiGHS."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from _search_cases import FIXTURE, ROOT, check_feasible_policy, resnet18_case
from hypothesis import given, settings
from hypothesis import strategies as st

import fxmpq
from fxmpq import Budget, Indicators, SearchStatus
from fxmpq.policy_search import ilp
from fxmpq.policy_search.problem import Problem
from fxmpq.policy_search.solve import Solver


class MipOnly(Solver):
    """The solver with its dynamic program switched off: every undecided instance goes to HiGHS."""

    def _enumerate(self, *args):
        return None


def _instance(data) -> tuple[SimpleNamespace, np.ndarray, list[int]]:
    """A random multiple-choice knapsack with small integer objective and costs (many ties and exact limits)."""
    U = data.draw(st.integers(1, 4), label="units")
    K = data.draw(st.integers(0, 2), label="limits")
    sizes = [data.draw(st.integers(1, 4)) for _ in range(U)]
    n = sum(sizes)
    ints = st.integers(0, 12)
    obj = np.array(data.draw(st.lists(ints, min_size=n, max_size=n), label="obj"), dtype=float)
    cost = np.array(data.draw(st.lists(ints, min_size=n * K, max_size=n * K), label="cost"), dtype=float)
    pinned = np.array(data.draw(st.lists(st.integers(0, 3), min_size=K, max_size=K), label="pinned"), dtype=float)
    lim = np.array(data.draw(st.lists(st.integers(0, 40), min_size=K, max_size=K), label="lim"), dtype=float)
    prob = SimpleNamespace(units=[None] * U, obj=obj, cost=cost.reshape(K, n), pinned_cost=pinned,
                           col_unit=np.repeat(np.arange(U), sizes))
    return prob, lim, list(range(K))


def _fits(prob, sel, lim) -> bool:
    """Recomputed from the arrays, not taken from the solver: one column per unit, every limit met."""
    one_each = sorted(prob.col_unit[sel].tolist()) == list(range(len(prob.units)))
    return one_each and bool(np.all(prob.cost[:, sel].sum(axis=1) + prob.pinned_cost <= lim))


def _brute(prob, lim) -> float | None:
    per_unit = [np.flatnonzero(prob.col_unit == u) for u in range(len(prob.units))]
    values = [float(prob.obj[list(s)].sum()) for s in itertools.product(*per_unit) if _fits(prob, list(s), lim)]
    return min(values) if values else None


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_solver_matches_brute_force_on_random_instances(data) -> None:
    prob, lim, kidx = _instance(data)
    best = _brute(prob, lim)
    cols = np.arange(len(prob.obj))
    for cls in (Solver, MipOnly):
        out = cls(prob, cols, kidx, lim, None).run()
        if best is None:
            assert out is None
            continue
        assert out is not None and out.status is SearchStatus.OPTIMAL
        assert _fits(prob, out.sel, lim)
        assert float(prob.obj[out.sel].sum()) == pytest.approx(best, abs=1e-9)
        assert out.lp_bound <= best + 1e-9
    found = Solver(prob, cols, kidx, lim, None).find_feasible()
    assert (found is None) == (best is None)
    if found is not None:
        assert _fits(prob, found, lim)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_find_feasible_decides_zero_objective_instances(data) -> None:
    """The feasibility test on zero-objective instances (what check_feasible hands it), against enumeration."""
    prob, lim, kidx = _instance(data)
    prob.obj = np.zeros_like(prob.obj)
    found = Solver(prob, np.arange(len(prob.obj)), kidx, lim, None).find_feasible()
    exists = _brute(prob, lim) is not None
    assert (found is not None) == exists
    if found is not None:
        assert _fits(prob, found, lim)


def test_start_from_a_known_policy_keeps_the_optimum() -> None:
    prob = SimpleNamespace(units=[None] * 3, obj=np.array([3.0, 1.0, 2.0, 0.0, 5.0, 4.0]),
                           cost=np.array([[1.0, 4.0, 1.0, 3.0, 0.0, 2.0]]), pinned_cost=np.zeros(1),
                           col_unit=np.array([0, 0, 1, 1, 2, 2]))
    lim = np.array([6.0])
    cols = np.arange(6)
    cold = Solver(prob, cols, [0], lim, None).run()
    warm = Solver(prob, cols, [0], lim, None).run(cold.sel)
    assert float(prob.obj[warm.sel].sum()) == float(prob.obj[cold.sel].sum()) == _brute(prob, lim)


@pytest.fixture(scope="module")
def r18():
    return resnet18_case()


def test_resnet50_fixture_matches_plain_highs() -> None:
    a = fxmpq.analyze(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    ind = Indicators.from_json(FIXTURE)
    budget = Budget.uniform(3, 4) & Budget.compression(12.2)
    res = fxmpq.search(a, ind, budget)
    check_feasible_policy(a, res.policy, res.limits)
    assert res.status is SearchStatus.OPTIMAL and res.lp_bound <= res.objective
    # the same formulation, all columns, plain HiGHS MIP without our reductions
    prob = Problem.from_indicators(a, ind, 2.0, False, "paper")
    n, U = len(prob.obj), len(prob.units)
    order = np.argsort(prob.col_unit, kind="stable")
    eq = ilp.Rows(np.searchsorted(prob.col_unit[order], np.arange(U + 1)), order, np.ones(n))
    kidx = [prob.metrics.index(k) for k in res.limits]
    kn = ilp.Rows(np.arange(len(kidx) + 1) * n, np.tile(np.arange(n), len(kidx)),
                  (prob.cost[kidx] / np.array(list(res.limits.values()))[:, None]).ravel())
    lim = np.array([(v - prob.pinned_cost[k]) / v for k, v in zip(kidx, res.limits.values())])
    plain = ilp.solve(prob.obj, ilp.Rows.stack([eq, kn]), np.concatenate([np.ones(U), [-np.inf] * len(kidx)]),
                      np.concatenate([np.ones(U), lim]))
    assert plain.status is ilp.Status.OPTIMAL
    assert res.objective == pytest.approx(plain.objective, rel=1e-9)


@pytest.mark.parametrize("budget", ["w3a4&c12.2", "w4a4&c10", "w2a4&c14", "w3a3"])
def test_dynamic_program_and_highs_branch_and_bound_agree(r18, budget, monkeypatch) -> None:
    """The exact finishers: the dynamic program (tried first) and HiGHS's MIP (where the program gives up)."""
    a, ind = r18
    dp = fxmpq.search(a, ind, budget)
    monkeypatch.setattr(Solver, "_enumerate", lambda *a: None)  # every instance goes to HiGHS
    mip = fxmpq.search(a, ind, budget)
    assert dp.optimal and mip.optimal
    assert dp.n_vars_mip == 0 and mip.n_vars_mip > 0  # each finisher really ran
    assert dp.objective == pytest.approx(mip.objective, rel=1e-12, abs=1e-12)
    check_feasible_policy(a, dp.policy, dp.limits)


def test_many_undecided_layers_are_proved_by_the_dynamic_program() -> None:
    """resnext101_64x4d with the indicators of two joint-training steps on random data (from the zoo sweep):
    85 layers stay undecided after fixing; the program proves the optimum (HiGHS's branch and bound took 41 s)."""
    a = fxmpq.analyze(torchvision.models.resnext101_64x4d(), torch.randn(1, 3, 32, 32))
    ind = Indicators.from_json(ROOT / "tests" / "data" / "resnext101_64x4d_zoo_indicators.json")
    res = fxmpq.search(a, ind, Budget.uniform(4, 4))
    assert res.optimal and res.gap == 0 and res.n_vars_mip == 0
    check_feasible_policy(a, res.policy, res.limits)


def _scaled(ind: Indicators, factor: dict[str, float]) -> Indicators:
    return Indicators(layers=ind.layers, bits=ind.bits,
                      weight={n: {b: v * factor.get(n, 1.0) for b, v in r.items()} for n, r in ind.weight.items()},
                      act={n: {b: v * factor.get(n, 1.0) for b, v in r.items()} for n, r in ind.act.items()})


def test_indicators_of_any_magnitude_solve_to_the_same_optimum() -> None:
    """Random-weight nets give step sizes up to 4e14 (timm mobileone_s0): the solver works on the objective in
    units of its largest term, so a uniform scale changes nothing and a huge outlier neither hangs nor misleads."""
    analysis, ind = resnet18_case()
    budget = Budget.uniform(3, 4)
    base = fxmpq.search(analysis, ind, budget)
    huge = fxmpq.search(analysis, _scaled(ind, dict.fromkeys(ind.layers, 4e14)), budget)
    assert huge.policy == base.policy and huge.status is SearchStatus.OPTIMAL
    assert huge.objective == pytest.approx(base.objective * 4e14, rel=1e-9)
    outlier = _scaled(ind, {ind.layers[3]: 4e14})
    res = fxmpq.search(analysis, outlier, budget, time_limit=10)
    assert res.status is SearchStatus.OPTIMAL and res.gap <= 1e-9 * res.objective
    check_feasible_policy(analysis, res.policy, res.limits)


def test_a_time_limit_bounds_the_whole_solve_and_states_the_gap() -> None:
    analysis, ind = resnet18_case()
    res = fxmpq.search(analysis, ind, Budget.uniform(3, 4), time_limit=1e-6)
    assert res.status in (SearchStatus.OPTIMAL, SearchStatus.FEASIBLE)
    assert res.gap >= 0 and (res.status is SearchStatus.OPTIMAL or res.gap > 0 or res.bound <= res.objective)
    check_feasible_policy(analysis, res.policy, res.limits)
