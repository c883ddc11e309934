"""search()/pareto(): feasibility checked independently, brute-force optimality, pins, ties, errors, the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from models import ResidualNet

import fxmpq
from fxmpq import Budget, IndicatorError, Indicators, InfeasibleBudget
from fxmpq.hardware import loads_hardware

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "limpq_resnet50_indicators.json"
search_mod = sys.modules["fxmpq.search"]
sys.path.insert(0, str(ROOT / "tools"))
from bench_search import resnet18_indicators  # noqa: E402

SMALL_HW = """
[target]
name = "small"
weight_bits = [2, 4, 8]
act_bits = [4, 8]
share_input_quantizer = {share}
[metrics.bitops]
terms = [{{ type = "bitops" }}]
[metrics.size]
terms = [{{ type = "weight_bits" }}]
"""


def _small(share: bool) -> fxmpq.Analysis:
    hw = loads_hardware(SMALL_HW.format(share=str(share).lower()), "small.toml")
    return fxmpq.analyze(ResidualNet(), torch.randn(1, 3, 16, 16), hardware=hw)


ANALYSES = {s: _small(s) for s in (False, True)}


def _check_feasible(analysis, res, limits) -> None:
    totals = analysis.cost(res.policy)  # recomputed here, not taken from the solver
    for k, v in limits.items():
        assert totals[k] <= v * (1 + 1e-12)
    for m in analysis.layers:
        assert analysis.hardware.supports(*res.policy[m.name]) or m.pinned


def _brute(analysis, ind, limits, alpha, ties):
    names = [m.name for m in analysis.searchable]
    pairs = [p for p in analysis.hardware.pairs if p[0] in ind.bits and p[1] in ind.bits]
    best = None
    for combo in itertools.product(pairs, repeat=len(names)):
        pol = dict(zip(names, combo))
        if any(len({pol[n][1] for n in g if n in pol}) > 1 for g in ties):
            continue
        tot = analysis.cost(fxmpq.Policy(pol))
        if any(tot[k] > v for k, v in limits.items()):
            continue
        obj = sum(alpha * ind.weight[n][w] + ind.act[n][a] for n, (w, a) in pol.items())
        best = obj if best is None else min(best, obj)
    return best


def _monotone_indicators(names, bits, draw_row):
    weight, act = {}, {}
    for n in names:
        w = sorted(draw_row(), reverse=True)
        a = sorted(draw_row(), reverse=True)
        weight[n] = dict(zip(sorted(bits), w))
        act[n] = dict(zip(sorted(bits), a))
    return Indicators(layers=tuple(names), bits=bits, weight=weight, act=act)


@settings(max_examples=25, deadline=None)
@given(share=st.booleans(), alpha=st.sampled_from([0.5, 2.0]), frac_b=st.floats(0.0, 1.2),
       frac_s=st.floats(0.0, 1.2), data=st.data())
def test_optimal_against_brute_force(share, alpha, frac_b, frac_s, data) -> None:
    analysis = ANALYSES[share]
    names = [m.name for m in analysis.searchable]
    bits = (2, 4, 8)
    row = st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3)
    ind = _monotone_indicators(names, bits, lambda: data.draw(row))
    lo = analysis.cost(fxmpq.Policy.uniform(analysis, 2, 4))
    hi = analysis.cost(fxmpq.Policy.uniform(analysis, 8, 8))
    limits = {k: lo[k] + f * (hi[k] - lo[k]) for k, f in (("bitops", frac_b), ("size", frac_s))}
    ties = analysis.shared_input_groups() if share else []
    best = _brute(analysis, ind, limits, alpha, ties)
    if best is None:
        with pytest.raises(InfeasibleBudget, match="smallest achievable"):
            fxmpq.search(analysis, ind, Budget(**limits), alpha)
        return
    res = fxmpq.search(analysis, ind, Budget(**limits), alpha)
    assert res.status == "optimal" and res.gap <= 1e-9
    assert res.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    _check_feasible(analysis, res, limits)
    for g in ties:
        assert len({res.policy[n][1] for n in g}) == 1


def _resnet18_indicators(analysis) -> Indicators:
    return resnet18_indicators(analysis, Indicators.from_json(FIXTURE))


@pytest.fixture(scope="module")
def r18():
    a = fxmpq.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    return a, _resnet18_indicators(a)


def test_pins_honoured_and_policy_complete(r18) -> None:
    a, ind = r18
    res = fxmpq.search(a, ind, "w3a4&c12.2")
    assert set(res.policy) == set(a.names)
    assert res.policy["conv1"] == (8, 8) and res.policy["fc"] == (8, 8)
    _check_feasible(a, res, res.limits)
    assert res.status == "optimal"
    assert res.lp_bound <= res.objective + 1e-12
    assert res.n_vars == 19 * 25 and res.n_vars_reduced <= res.n_vars


def test_tied_layers_share_activation_bits_on_resnet18() -> None:
    text = (ROOT / "hardware" / "bitops.toml").read_text().replace(
        'act_bits = [2, 3, 4, 5, 6, 7, 8]', 'act_bits = [2, 3, 4, 5, 6, 7, 8]\nshare_input_quantizer = true')
    hw = loads_hardware(text, "bitops-shared.toml")
    assert hw.share_input_quantizer
    a = fxmpq.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), hardware=hw)
    ind = _resnet18_indicators(a)
    groups = a.shared_input_groups()
    assert ["layer2.0.conv1", "layer2.0.downsample.0"] in groups
    res = fxmpq.search(a, ind, "w3a4&c12.2")
    for g in groups:
        assert len({res.policy[n][1] for n in g}) == 1, g
    _check_feasible(a, res, res.limits)
    # untied, the optimum splits at least one group: the tie is a real constraint here
    free = fxmpq.search(fxmpq.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)), ind, "w3a4&c12.2")
    assert free.objective <= res.objective + 1e-12


def test_unsupported_pairs_never_chosen() -> None:
    hw = loads_hardware("""
[target]
name = "a100-like"
weight_bits = [4, 8]
act_bits = [4, 8]
pairs = [[4, 4], [8, 8]]
[metrics.bitops]
terms = [{ type = "bitops" }]
""", "a100.toml")
    a = fxmpq.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), hardware=hw)
    ind = _resnet18_indicators(a)
    ind = Indicators(layers=ind.layers, bits=(2, 3, 4, 5, 6, 8),
                     weight={n: {**ind.weight[n], 8: min(ind.weight[n].values()) / 2} for n in ind.layers},
                     act={n: {**ind.act[n], 8: min(ind.act[n].values()) / 2} for n in ind.layers})
    for frac in (0.3, 0.6, 0.9):
        lo = a.cost(fxmpq.Policy.uniform(a, 4, 4))["bitops"]
        hi = a.cost(fxmpq.Policy.uniform(a, 8, 8))["bitops"]
        res = fxmpq.search(a, ind, Budget(bitops=lo + frac * (hi - lo)))
        assert all(res.policy[n] in {(4, 4), (8, 8)} for n in a.names)
        assert {res.policy[m.name] for m in a.searchable} == {(4, 4), (8, 8)}


def test_infeasible_budget_states_smallest_achievable(r18) -> None:
    a, ind = r18
    with pytest.raises(InfeasibleBudget, match=r"bitops <= 1 \(smallest achievable [0-9.e+]+\)"):
        fxmpq.search(a, ind, Budget(bitops=1.0))


def test_indicator_mismatch_lists_missing(r18) -> None:
    a, ind = r18
    short = Indicators(layers=ind.layers[1:], bits=ind.bits, weight={n: ind.weight[n] for n in ind.layers[1:]},
                       act={n: ind.act[n] for n in ind.layers[1:]})
    with pytest.raises(IndicatorError, match=ind.layers[0]):
        fxmpq.search(a, short, "w3a4")


def test_budget_conjunction_in_search(r18) -> None:
    a, ind = r18
    both = fxmpq.search(a, ind, Budget.uniform(3, 4) & Budget.compression(14))
    only_b = fxmpq.search(a, ind, Budget.uniform(3, 4))
    assert set(both.limits) == {"bitops", "size"}
    assert both.totals["size"] <= both.limits["size"]
    assert both.objective >= only_b.objective - 1e-12


def test_pareto_monotone(r18, tmp_path) -> None:
    a, ind = r18
    par = fxmpq.pareto(a, ind, metric="bitops", points=8)
    assert len(par) == 8 and list(par.budgets) == sorted(par.budgets)
    objs = [r.objective for r in par]
    assert all(x >= y - 1e-12 for x, y in itertools.pairwise(objs))
    for b, r in zip(par.budgets, par):
        assert a.cost(r.policy)["bitops"] <= b * (1 + 1e-12)
        assert r.status == "optimal"
    assert par.plot(tmp_path / "p.png", a).stat().st_size > 0


def test_paper_pricing_is_a_price_not_a_removal() -> None:
    a = ANALYSES[False]
    names = [m.name for m in a.searchable]
    # weight step at 2 bits smaller than at 4 bits: 2-bit weights are priced prohibitively
    ind = Indicators(layers=tuple(names), bits=(2, 4, 8),
                     weight={n: {2: 0.1, 4: 0.5, 8: 0.05} for n in names},
                     act={n: {4: 0.2, 8: 0.1} for n in names})
    loose = fxmpq.search(a, ind, Budget.uniform(4, 4))
    assert loose.priced_points == 0 and all(loose.policy[n][0] != 2 for n in names)
    tight_limit = a.cost(fxmpq.Policy.uniform(a, 2, 4))["size"]
    tight = fxmpq.search(a, ind, Budget(size=tight_limit))  # only 2-bit weights fit
    assert all(tight.policy[n][0] == 2 for n in names)
    assert tight.priced_points == len(names) and tight.status == "optimal" and tight.gap <= 1e-9
    iso = fxmpq.search(a, ind, Budget(size=tight_limit), clean="isotonic")
    assert iso.priced_points == 0 and iso.objective < tight.objective


def test_pav_decreasing() -> None:
    out = search_mod._pav_decreasing(np.array([0.1, 0.5, 0.05]))
    assert np.all(np.diff(out) <= 1e-15)
    assert out.sum() == pytest.approx(0.65)


def test_result_json_and_table(r18) -> None:
    a, ind = r18
    res = fxmpq.search(a, ind, "w4a4")
    data = json.loads(res.to_json())
    assert fxmpq.Policy.from_json(json.dumps(data["policy"])) == res.policy
    assert data["status"] == "optimal"
    text = res.table(a, ind)
    assert "layer1.0.conv1" in text and "bitops %" in text


def test_resnet50_fixture_matches_plain_highs() -> None:
    a = fxmpq.analyze(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    ind = Indicators.from_json(FIXTURE)
    budget = Budget.uniform(3, 4) & Budget.compression(12.2)
    res = fxmpq.search(a, ind, budget)
    _check_feasible(a, res, res.limits)
    assert res.status == "optimal" and res.lp_bound <= res.objective
    # the same formulation, all columns, plain HiGHS MIP without our reductions
    prob = search_mod._Problem(a, ind, 2.0, False, "paper")
    n, U = len(prob.obj), len(prob.units)
    from fxmpq import ilp

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
    monkeypatch.setattr(search_mod._Solver, "_enumerate", lambda *a: None)  # every instance goes to HiGHS
    mip = fxmpq.search(a, ind, budget)
    assert dp.optimal and mip.optimal
    assert dp.n_vars_mip == 0 and mip.n_vars_mip > 0  # each finisher really ran
    assert dp.objective == pytest.approx(mip.objective, rel=1e-12, abs=1e-12)
    _check_feasible(a, dp, dp.limits)


def test_many_undecided_layers_are_proved_by_the_dynamic_program() -> None:
    """resnext101_64x4d with the indicators of two joint-training steps on random data (from the zoo sweep):
    85 layers stay undecided after fixing; the program proves the optimum (HiGHS's branch and bound took 41 s)."""
    a = fxmpq.analyze(torchvision.models.resnext101_64x4d(), torch.randn(1, 3, 32, 32))
    ind = Indicators.from_json(ROOT / "tests" / "data" / "resnext101_64x4d_zoo_indicators.json")
    res = fxmpq.search(a, ind, Budget.uniform(4, 4))
    assert res.optimal and res.gap == 0 and res.n_vars_mip == 0
    _check_feasible(a, res, res.limits)


def test_cli_search(tmp_path) -> None:
    out = tmp_path / "policy.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "search.py"), "--indicators", str(FIXTURE),
                           "--model", "resnet50", "--input", "3x224x224", "--budget", "w3a4&c12.2",
                           "--out", str(out), "--plot", str(tmp_path / "bits.png")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "layer4.2.conv3" in proc.stdout and "status optimal" in proc.stdout
    pol = fxmpq.Policy.from_json(out)
    assert pol["conv1"] == (8, 8) and len(pol) == 54
    assert (tmp_path / "bits.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "search.py"), "--indicators", str(FIXTURE),
                          "--model", "resnet50", "--budget", "w3a4&x"], capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
