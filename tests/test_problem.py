"""Problem building: columns per unit and pair, tied groups, prices, minima against enumeration, argument errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _search_cases import monotone_indicators, policies, small_analysis

import fxmpq
from fxmpq import ArgumentError, Indicators, InfeasibleBudget
from fxmpq.core.dominance import nondominated
from fxmpq.policy_search.problem import Problem, candidate_pairs, infeasible_budget

ANALYSES = {s: small_analysis(s) for s in (False, True)}
BITS = (2, 4, 8)


def _ind(analysis) -> Indicators:
    names = [m.name for m in analysis.searchable]
    rows = iter(itertools.cycle([[0.9, 0.5, 0.2], [0.8, 0.3, 0.25], [0.7, 0.6, 0.1]]))
    return monotone_indicators(names, BITS, lambda: next(rows))


def test_untied_problem_has_a_column_per_layer_and_pair() -> None:
    a = ANALYSES[False]
    ind = _ind(a)
    prob = Problem.from_indicators(a, ind, alpha=2.0)
    assert prob.pairs == list(a.hardware.pairs)
    assert len(prob.units) == len(a.searchable) and len(prob.obj) == len(a.searchable) * len(prob.pairs)
    for u, unit in enumerate(prob.units):
        (n,) = unit.layers
        cols = np.flatnonzero(prob.col_unit == u)
        expected = [2.0 * ind.weight[n][w] + ind.act[n][x] for w, x in prob.pairs]
        assert prob.obj[cols] == pytest.approx(expected)
        costs = [a.layer_cost(n, w, x) for w, x in prob.pairs]
        assert np.allclose(prob.cost[:, cols].T, [[c[k] for k in prob.metrics] for c in costs], rtol=1e-12)
    pinned = [sum(a.layer_cost(m.name, *m.pin_bits)[k] for m in a.pinned) for k in prob.metrics]
    assert prob.pinned_cost == pytest.approx(pinned)


def test_tied_group_choices_are_the_pareto_minimal_combinations() -> None:
    a = ANALYSES[True]
    ind = _ind(a)
    prob = Problem.from_indicators(a, ind, alpha=2.0)
    (group,) = a.shared_input_groups()
    unit = next(u for u in prob.units if len(u.layers) > 1)
    assert list(unit.layers) == group
    # enumerate every combination sharing one activation bit-width, keep the non-dominated ones
    rows, combos = [], []
    for x in sorted({p[1] for p in prob.pairs}):
        for ws in itertools.product([w for w, y in prob.pairs if y == x], repeat=len(group)):
            obj = sum(2.0 * ind.weight[n][w] + ind.act[n][x] for n, w in zip(group, ws))
            cost = [sum(a.layer_cost(n, w, x)[k] for n, w in zip(group, ws)) for k in prob.metrics]
            rows.append([0, obj, *cost])
            combos.append(tuple((w, x) for w in ws))
    keep = nondominated(np.array(rows))
    got = sorted(tuple(map(tuple, c.tolist())) for c in unit.choices)
    assert got == sorted(combos[i] for i in keep)
    assert all(len({p[1] for p in c}) == 1 for c in got)


@pytest.mark.parametrize("share", [False, True])
def test_min_totals_match_enumeration(share) -> None:
    a = ANALYSES[share]
    prob = Problem.costs_only(a, BITS)
    assert not prob.obj.any() and not prob.priced.any()
    ties = a.shared_input_groups() if share else []
    totals = [a.cost(p) for p in policies(a, list(a.hardware.pairs), ties)]
    expected = [min(t[k] for t in totals) for k in prob.metrics]
    assert prob.min_totals() == pytest.approx(expected, rel=1e-12)


def test_prices_and_unpriced_columns() -> None:
    a = ANALYSES[False]
    names = [m.name for m in a.searchable]
    ind = Indicators(layers=tuple(names), bits=BITS, weight={n: {2: 0.1, 4: 0.5, 8: 0.05} for n in names},
                     act={n: {4: 0.2, 8: 0.1} for n in names})
    prob = Problem.from_indicators(a, ind, alpha=2.0)
    assert prob.price > 2.0 * 0.5 * len(names)
    w2 = np.array([prob.pairs[c][0] == 2 for c in prob.col_choice])
    assert (prob.priced > 0).tolist() == w2.tolist()
    assert prob.unpriced_cols.tolist() == np.flatnonzero(~w2).tolist()
    iso = Problem.from_indicators(a, ind, alpha=2.0, clean="isotonic")
    assert not iso.priced.any() and iso.unpriced_cols.tolist() == list(range(len(iso.obj)))


def test_candidate_pairs() -> None:
    hw = ANALYSES[False].hardware
    assert candidate_pairs(hw, None, False) == list(hw.pairs)
    assert candidate_pairs(hw, (2, 4), False) == [(2, 4), (4, 4)]
    assert candidate_pairs(hw, (2, 4, 8), True) == [(2, 8), (4, 8), (8, 8)]  # the widest activations
    assert candidate_pairs(hw, (3,), False) == []


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf"), "2", True, None])
def test_bad_alpha_is_an_argument_error(alpha) -> None:
    a = ANALYSES[False]
    with pytest.raises(ArgumentError, match="alpha must be a finite non-negative number"):
        Problem.from_indicators(a, _ind(a), alpha=alpha)


def test_costs_only_names_bits_that_cover_no_pair() -> None:
    with pytest.raises(ArgumentError, match=r"bits \[3, 5\] cover none of hardware 'small'"):
        Problem.costs_only(ANALYSES[False], (3, 5))


def test_infeasible_budget_message() -> None:
    err = infeasible_budget({"bitops": 10.0, "size": 5.0}, {"bitops": 20.0, "size": 1.0}, jointly=False)
    assert isinstance(err, InfeasibleBudget) and isinstance(err, fxmpq.BudgetError)
    assert str(err) == ("no policy meets the budget: bitops <= 10 (smallest achievable 20); size <= 5 (smallest "
                        "achievable 1). Loosen the budget or allow more bit-widths.")
    joint = infeasible_budget({"bitops": 10.0}, {"bitops": 1.0}, jointly=True)
    assert "(each limit alone is reachable, but not all of them at once)" in str(joint)
