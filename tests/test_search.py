"""search()/pareto()/check_feasible(): feasibility re-checked, brute-force optima, pins, ties, errors, the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from _search_cases import (
    FIXTURE,
    ROOT,
    brute,
    check_feasible_policy,
    monotone_indicators,
    policies,
    r18_indicators,
    resnet18_case,
    small_analysis,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from models import ResidualNet

import fxmpq
from fxmpq import (
    ArgumentError,
    Budget,
    BudgetError,
    IndicatorError,
    Indicators,
    InfeasibleBudget,
    SearchStatus,
)
from fxmpq.hardware.spec import loads_hardware
from fxmpq.policy_search.api import check_feasible

ANALYSES = {s: small_analysis(s) for s in (False, True)}


@settings(max_examples=25, deadline=None)
@given(share=st.booleans(), alpha=st.sampled_from([0.5, 2.0]), frac_b=st.floats(0.0, 1.2),
       frac_s=st.floats(0.0, 1.2), data=st.data())
def test_optimal_against_brute_force(share, alpha, frac_b, frac_s, data) -> None:
    analysis = ANALYSES[share]
    names = [m.name for m in analysis.searchable]
    bits = (2, 4, 8)
    row = st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3)
    ind = monotone_indicators(names, bits, lambda: data.draw(row))
    lo = analysis.cost(fxmpq.Policy.uniform(analysis, 2, 4))
    hi = analysis.cost(fxmpq.Policy.uniform(analysis, 8, 8))
    limits = {k: lo[k] + f * (hi[k] - lo[k]) for k, f in (("bitops", frac_b), ("size", frac_s))}
    ties = analysis.shared_input_groups() if share else []
    best = brute(analysis, ind, limits, alpha, ties)
    if best is None:
        with pytest.raises(InfeasibleBudget, match="smallest achievable"):
            fxmpq.search(analysis, ind, Budget(**limits), alpha)
        return
    res = fxmpq.search(analysis, ind, Budget(**limits), alpha)
    assert res.status is SearchStatus.OPTIMAL and res.gap <= 1e-9
    assert res.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    check_feasible_policy(analysis, res.policy, limits)
    for g in ties:
        assert len({res.policy[n][1] for n in g}) == 1


@pytest.fixture(scope="module")
def r18():
    return resnet18_case()


def test_pins_honoured_and_policy_complete(r18) -> None:
    a, ind = r18
    res = fxmpq.search(a, ind, "w3a4&c12.2")
    assert set(res.policy) == set(a.names)
    assert res.policy["conv1"] == (8, 8) and res.policy["fc"] == (8, 8)
    check_feasible_policy(a, res.policy, res.limits)
    assert res.status is SearchStatus.OPTIMAL
    assert res.lp_bound <= res.objective + 1e-12
    assert res.n_vars == 19 * 25 and res.n_vars_reduced <= res.n_vars


def test_tied_layers_share_activation_bits_on_resnet18() -> None:
    text = (ROOT / "hardware" / "bitops.toml").read_text().replace(
        'act_bits = [2, 3, 4, 5, 6, 7, 8]', 'act_bits = [2, 3, 4, 5, 6, 7, 8]\nshare_input_quantizer = true')
    hw = loads_hardware(text, "bitops-shared.toml")
    assert hw.share_input_quantizer
    a = fxmpq.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), hardware=hw)
    ind = r18_indicators(a)
    groups = a.shared_input_groups()
    assert ["layer2.0.conv1", "layer2.0.downsample.0"] in groups
    res = fxmpq.search(a, ind, "w3a4&c12.2")
    for g in groups:
        assert len({res.policy[n][1] for n in g}) == 1, g
    check_feasible_policy(a, res.policy, res.limits)
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
    ind = r18_indicators(a)
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
        assert r.status is SearchStatus.OPTIMAL
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
    assert tight.priced_points == len(names) and tight.status is SearchStatus.OPTIMAL and tight.gap <= 1e-9
    iso = fxmpq.search(a, ind, Budget(size=tight_limit), clean="isotonic")
    assert iso.priced_points == 0 and iso.objective < tight.objective


def test_result_json_and_table(r18) -> None:
    a, ind = r18
    res = fxmpq.search(a, ind, "w4a4")
    data = json.loads(res.to_json())
    assert fxmpq.Policy.from_json(json.dumps(data["policy"])) == res.policy
    assert data["status"] == "optimal"
    text = res.table(a, ind)
    assert "layer1.0.conv1" in text and "bitops %" in text


@settings(max_examples=40, deadline=None)
@given(share=st.booleans(), frac_b=st.floats(-0.1, 1.1), frac_s=st.floats(-0.1, 1.1),
       bits=st.sampled_from([(2, 4, 8), (4, 8), (2, 8)]))
def test_check_feasible_against_enumeration(share, frac_b, frac_s, bits) -> None:
    """check_feasible (no indicators) raises exactly when no policy over `bits` meets the limits, by enumeration."""
    analysis = ANALYSES[share]
    pairs = [p for p in analysis.hardware.pairs if p[0] in bits and p[1] in bits]
    ties = analysis.shared_input_groups() if share else []
    totals = [analysis.cost(pol) for pol in policies(analysis, pairs, ties)]
    lo = {k: min(t[k] for t in totals) for k in ("bitops", "size")}
    hi = {k: max(t[k] for t in totals) for k in ("bitops", "size")}
    limits = {k: lo[k] + f * (hi[k] - lo[k]) for k, f in (("bitops", frac_b), ("size", frac_s))}
    # within the library's feasibility tolerance (1e-12 relative, as check_feasible_policy): a limit 2e-16 below
    # the smallest total is that total, not an infeasible budget
    exists = any(all(t[k] <= v * (1 + 1e-12) for k, v in limits.items()) for t in totals)
    if exists:
        assert check_feasible(analysis, Budget(**limits), bits) == limits
    else:
        with pytest.raises(InfeasibleBudget, match="smallest achievable"):
            check_feasible(analysis, Budget(**limits), bits)


JOINT_HW = """
[target]
name = "joint"
weight_bits = [2, 4, 8]
act_bits = [2, 8]
pairs = [[2, 8], [4, 2], [8, 8]]
[metrics.bitops]
terms = [{ type = "bitops" }]
[metrics.size]
terms = [{ type = "weight_bits" }]
"""


def test_limits_reachable_alone_but_not_together() -> None:
    """W4A2 has the least BitOps, W2A8 the least size: both minima at once is no policy. check_feasible and
    search raise the same message."""

    a = fxmpq.analyze(ResidualNet(), torch.randn(1, 3, 16, 16), hardware=loads_hardware(JOINT_HW, "joint.toml"))
    budget = Budget(bitops=a.cost(fxmpq.Policy.uniform(a, 4, 2))["bitops"],
                    size=a.cost(fxmpq.Policy.uniform(a, 2, 8))["size"])
    names = [m.name for m in a.searchable]
    ind = monotone_indicators(names, (2, 4, 8), lambda: [0.9, 0.4, 0.1])
    with pytest.raises(InfeasibleBudget, match=r"each limit alone is reachable, but not all of them at once") as e1:
        check_feasible(a, budget)
    with pytest.raises(InfeasibleBudget) as e2:
        fxmpq.search(a, ind, budget)
    assert str(e1.value) == str(e2.value)
    # one limit alone is met (by the uniform policy it came from)
    assert check_feasible(a, Budget(bitops=budget.absolute["bitops"])) == {"bitops": budget.absolute["bitops"]}


def test_check_feasible_and_search_state_the_same_smallest_achievable(r18) -> None:
    a, ind = r18
    with pytest.raises(InfeasibleBudget) as e1:
        check_feasible(a, "bitops<=1 & c12.2", ind.bits)
    with pytest.raises(InfeasibleBudget) as e2:
        fxmpq.search(a, ind, "bitops<=1 & c12.2")
    assert str(e1.value) == str(e2.value) and "(each limit alone" not in str(e1.value)
    assert check_feasible(a, {"bitops": 1e12}) == {"bitops": 1e12}


def test_search_accepts_the_budget_forms_and_the_cleaning_enum(r18) -> None:
    a, ind = r18
    limits = Budget.uniform(3, 4).resolve(a)
    by_str = fxmpq.search(a, ind, "w3a4")
    by_dict = fxmpq.search(a, ind, limits, clean=fxmpq.Cleaning.PAPER)
    assert by_str.policy == by_dict.policy and by_dict.limits == limits
    assert fxmpq.search(a, ind, "w3a4", clean=fxmpq.Cleaning.ISOTONIC).objective == pytest.approx(
        fxmpq.search(a, ind, "w3a4", clean="isotonic").objective)


def test_bad_arguments_raise_their_own_classes(r18) -> None:
    a, ind = r18
    with pytest.raises(ArgumentError, match="alpha must be a finite non-negative number, found -1"):
        fxmpq.search(a, ind, "w3a4", alpha=-1)
    with pytest.raises(ArgumentError, match="clean='monotone': expected one of paper, isotonic"):
        fxmpq.search(a, ind, "w3a4", clean="monotone")
    with pytest.raises(ArgumentError, match="time_limit"):
        fxmpq.search(a, ind, "w3a4", time_limit=0)
    with pytest.raises(ArgumentError, match="points must be an integer >= 1, found 0"):
        fxmpq.pareto(a, ind, points=0)
    with pytest.raises(BudgetError, match="budget must be a Budget, a budget string") as e:
        fxmpq.search(a, ind, 3.5)
    assert not isinstance(e.value, InfeasibleBudget)
    with pytest.raises(BudgetError, match="pareto metric 'latency' is not a metric") as e:
        fxmpq.pareto(a, ind, metric="latency")
    assert not isinstance(e.value, InfeasibleBudget)


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


def test_plot_bits_draws_weight_only_and_float_layers(tmp_path):
    """A weight-only layer (w-bit weights, float activations) draws its activation bar as float, beside float and
    integer layers (it used to fail on the float activation's None)."""
    from fxmpq.policy_search.report import plot_bits

    a = fxmpq.analyze(ResidualNet(), torch.randn(1, 3, 16, 16), hardware="ort_cpu")
    names = a.names
    policy = {n: (8, 8) for n in names}
    policy[names[0]] = (None, None)
    policy[names[-1]] = (4, None)  # the classifier, weight-only
    out = plot_bits(fxmpq.Policy(policy), a, tmp_path / "bits.png")
    assert out.stat().st_size > 0
