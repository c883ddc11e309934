"""fxmpq.candidates and search.ranked against brute force: distinct, feasible, ordered; the next-best exact."""

from __future__ import annotations

import numpy as np
import pytest
from _search_cases import check_feasible_policy, monotone_indicators, policies, small_analysis
from hypothesis import given, settings
from hypothesis import strategies as st

import fxmpq
from fxmpq import ArgumentError, Budget, CandidateSet, InfeasibleBudget, PolicyError, SearchStatus
from fxmpq.policy_search.api import ranked

ANALYSES = {s: small_analysis(s) for s in (False, True)}  # 3 searchable layers, 6 pairs: 216 policies
BITS = (2, 4, 8)


def _case(share: bool, seed: int, frac: float) -> tuple[fxmpq.Analysis, fxmpq.Indicators, dict[str, float]]:
    analysis = ANALYSES[share]
    rng = np.random.default_rng(seed)
    ind = monotone_indicators([m.name for m in analysis.searchable], BITS, lambda: list(rng.uniform(0.01, 1, 3)))
    lo = analysis.cost(fxmpq.Policy.uniform(analysis, 2, 4))
    hi = analysis.cost(fxmpq.Policy.uniform(analysis, 8, 8))
    return analysis, ind, {"bitops": lo["bitops"] + frac * (hi["bitops"] - lo["bitops"])}


def _feasible(analysis, ind, limits, alpha=2.0, ties=()) -> dict[fxmpq.Policy, float]:
    """Every policy within `limits` (by enumeration) -> its objective (the search's formula, by hand)."""
    pairs = [p for p in analysis.hardware.pairs if p[0] in BITS and p[1] in BITS]
    out = {}
    for pol in policies(analysis, pairs, list(ties)):
        if all(analysis.cost(pol)[k] <= v for k, v in limits.items()):
            out[pol.complete(analysis)] = sum(alpha * ind.weight[n][w] + ind.act[n][a] for n, (w, a) in pol.items())
    return out


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), frac=st.floats(0.0, 1.0), k=st.integers(1, 12))
def test_ranked_is_the_brute_force_order(seed, frac, k) -> None:
    analysis, ind, limits = _case(False, seed, frac)
    feasible = _feasible(analysis, ind, limits)
    if not feasible:
        with pytest.raises(InfeasibleBudget):
            ranked(analysis, ind, Budget(**limits), k)
        return
    got = ranked(analysis, ind, Budget(**limits), k)
    want = sorted(feasible.values())[:k]
    assert len(got) == len(want)  # fewer when fewer policies fit
    assert [r.objective for r in got] == pytest.approx(want, rel=1e-9)
    assert len({r.policy for r in got}) == len(got)
    for r in got:
        assert r.status is SearchStatus.OPTIMAL
        assert feasible[r.policy] == pytest.approx(r.objective, rel=1e-9)
        check_feasible_policy(analysis, r.policy, limits)


@pytest.mark.parametrize("seed,frac", [(0, 0.5), (1, 0.3), (2, 0.8)])
def test_candidate_set_is_distinct_feasible_ordered_and_exact(seed, frac) -> None:
    analysis, ind, limits = _case(False, seed, frac)
    feasible = _feasible(analysis, ind, limits)
    cs = fxmpq.candidates(analysis, ind, Budget(**limits), count=12)
    pols = [c.policy for c in cs]
    assert len(cs) == 12 and len(set(pols)) == 12
    objs = [c.objective for c in cs]
    assert objs == sorted(objs)
    for c in cs:
        assert c.policy in feasible and c.objective == pytest.approx(feasible[c.policy], rel=1e-9)
        assert c.totals == analysis.cost(c.policy)
        check_feasible_policy(analysis, c.policy, limits)
    # the optimum is first; the largest uniform policies that fit are there
    assert objs[0] == pytest.approx(min(feasible.values()), rel=1e-9)
    assert any(s.startswith("optimum (alpha 2)") for s in cs[0].sources)
    fits = [(w, a) for w, a in analysis.hardware.pairs
            if fxmpq.Policy.uniform(analysis, w, a).complete(analysis) in feasible]
    largest = [p for p in fits if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in fits)]
    assert largest
    for w, a in largest:
        assert fxmpq.Policy.uniform(analysis, w, a) in pols
    # the next-best are exact: no policy outside the set beats the last one of them
    nb = [c.objective for c in cs if any(s.startswith("next-best") for s in c.sources)]
    assert nb
    outside = [v for p, v in feasible.items() if p not in set(pols)]
    assert min(outside) >= max(nb) * (1 - 1e-9)


def test_a_large_count_gives_every_feasible_policy() -> None:
    analysis, ind, limits = _case(False, 3, 0.1)
    feasible = _feasible(analysis, ind, limits)
    cs = fxmpq.candidates(analysis, ind, Budget(**limits), count=len(feasible) + 5)
    assert {c.policy for c in cs} == set(feasible)


def test_shared_input_groups_keep_their_ties() -> None:
    analysis, ind, limits = _case(True, 4, 0.6)
    ties = analysis.shared_input_groups()
    assert ties
    feasible = _feasible(analysis, ind, limits, ties=ties)
    cs = fxmpq.candidates(analysis, ind, Budget(**limits), count=10)
    objs = [c.objective for c in cs]
    assert objs == sorted(objs) and len({c.policy for c in cs}) == len(cs) >= 5
    for c in cs:
        assert c.policy in feasible and c.objective == pytest.approx(feasible[c.policy], rel=1e-9)
        for g in ties:
            assert len({c.policy[n][1] for n in g}) == 1


def test_json_round_trip_and_table(tmp_path) -> None:
    analysis, ind, limits = _case(False, 0, 0.5)
    cs = fxmpq.candidates(analysis, ind, Budget(**limits), count=6)
    path = tmp_path / "candidates.json"
    cs.to_json(path)
    back = CandidateSet.from_json(path)
    assert back == cs and back.best is None
    text = cs.table()
    assert text.count("\n") >= 7 and "optimum (alpha 2)" in text and "bitops %" in text
    with pytest.raises(PolicyError, match="not an fxmpq candidates file"):
        CandidateSet.from_json('{"format": "other"}')


@pytest.mark.parametrize("kwargs,match", [({"count": 0}, "count must be an integer >= 1"),
                                          ({"alphas": [1.0, -2.0]}, "alphas must be finite non-negative"),
                                          ({"alphas": 3}, "alphas must be a sequence")])
def test_bad_arguments(kwargs, match) -> None:
    analysis, ind, limits = _case(False, 0, 0.5)
    with pytest.raises(ArgumentError, match=match):
        fxmpq.candidates(analysis, ind, Budget(**limits), **kwargs)


def test_front_candidates_are_ordered_by_the_metric_and_hold_the_uniform_policies() -> None:
    from fxmpq.policy_search.candidates import front_candidates

    analysis, ind, _ = _case(False, 5, 0.5)
    cs = front_candidates(analysis, ind, "bitops", points=8, budget="size<=1e9")
    costs = [c.totals["bitops"] for c in cs]
    assert costs == sorted(costs) and cs.metric == "bitops"
    assert len({c.policy for c in cs}) == len(cs)
    for w, a in analysis.hardware.pairs:
        assert fxmpq.Policy.uniform(analysis, w, a) in [c.policy for c in cs]
