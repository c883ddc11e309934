"""fxmpq.verify and fxmpq.measured_indicators on a model where the answer is known: one layer's 2-bit weights are
destroyed (a step so large that every weight rounds to 0), so every policy using them is the worst."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmpq
from fxmpq import ArgumentError, Candidate, CandidateSet, Indicators, Policy, PolicyError
from fxmpq.hardware.spec import loads_hardware

HW = loads_hardware("""
[target]
name = "tiny"
weight_bits = [2, 4, 8]
act_bits = [4, 8]
[pins]
first_layer = false
last_layer = false
[metrics.size]
terms = [{ type = "weight_bits" }]
""", "tiny.toml")


class Mlp(nn.Module):
    """8 -> 16 -> 4; the labels are this network's own argmax, so it is 100 % accurate in float."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def case():
    torch.manual_seed(0)
    model = Mlp().eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 8, generator=g) for _ in range(4)]
    with torch.no_grad():
        data = [(x, model(x).argmax(-1)) for x in xs]
    qm = fxmpq.prepare(model, torch.randn(2, 8), hardware=HW, bits=(2, 4, 8), act_bits=(4, 8))
    wq = qm.weight_quantizer("fc2")
    with torch.no_grad():
        wq.step[wq.bits.index(2)] = 1e3  # fc2 at 2 bits: all weights 0, a constant output
    return model, qm, data


def _cand(policy: dict, objective: float, analysis) -> Candidate:
    pol = Policy(policy)
    return Candidate(policy=pol, sources=("test",), objective=objective, totals=analysis.cost(pol))


def _set(qm, policies) -> CandidateSet:
    a = qm.analysis
    return CandidateSet(candidates=tuple(_cand(p, i, a) for i, p in enumerate(policies)), alpha=1.0,
                        limits={"size": 1e9})


DESTROYED = {"fc1": (8, 8), "fc2": (2, 8)}
LOW_FIRST = {"fc1": (2, 4), "fc2": (8, 8)}
HIGH = {"fc1": (8, 8), "fc2": (8, 8)}


def test_verify_picks_the_most_accurate_not_the_smallest_objective(case) -> None:
    _, qm, data = case
    cs = fxmpq.verify(qm, _set(qm, [DESTROYED, LOW_FIRST, HIGH]), data, max_batches=3)
    accs = [c.accuracy for c in cs]
    assert cs.samples == 192 and all(a is not None for a in accs)
    assert accs[0] < 0.6 < accs[2]  # the destroyed layer costs accuracy; W8A8 everywhere is near float
    assert cs.chosen == max(range(3), key=accs.__getitem__) and cs.best.policy == Policy(HIGH)
    # each estimate is fxmpq.accuracy of the jointly trained model at that policy, on the same batches
    qm.set_policy(Policy(LOW_FIRST))
    assert fxmpq.accuracy(qm, data, max_batches=3) == pytest.approx(accs[1])
    qm.disable_quant()
    marked = [line for line in cs.table().splitlines() if line.startswith(">")]
    assert len(marked) == 1 and marked[0].split()[1] == "2"  # the chosen row, by its index


def test_verify_restores_the_model_and_round_trips(case, tmp_path) -> None:
    _, qm, data = case
    qm.train()
    cs = fxmpq.verify(qm, _set(qm, [HIGH, DESTROYED]), data)
    assert qm.policy is None and qm.training  # quantizers off and training mode, as before the call
    cs.to_json(tmp_path / "c.json")
    back = CandidateSet.from_json(tmp_path / "c.json")
    assert back == cs and back.best.policy == Policy(HIGH)


def test_a_drop_target_walks_in_order_and_stops_at_the_first_within(case) -> None:
    _, qm, data = case
    order = [DESTROYED, LOW_FIRST, HIGH]
    loose = fxmpq.verify(qm, _set(qm, order), data, max_drop=1.0, reference_accuracy=1.0)
    assert loose.chosen == 0 and loose.target_met and [c.accuracy is None for c in loose] == [False, True, True]
    tight = fxmpq.verify(qm, _set(qm, order), data, max_drop=0.2, reference_accuracy=1.0)
    assert tight.best.policy == Policy(HIGH) and tight.target_met
    missed = fxmpq.verify(qm, _set(qm, order[:2]), data, max_drop=0.0, reference_accuracy=1.0)
    assert missed.target_met is False and missed.chosen == 1  # none within: the last, the most expensive
    assert "MISSES the target (the most expensive candidate was taken)" in missed.table()
    # even where the jointly trained model estimates it lower: its estimates are what missed the target
    lower_last = fxmpq.verify(qm, _set(qm, [LOW_FIRST, DESTROYED]), data, max_drop=0.0, reference_accuracy=1.0)
    assert lower_last.chosen == 1 and lower_last[0].accuracy > lower_last[1].accuracy
    # without a target, the most accurate
    assert fxmpq.verify(qm, _set(qm, [LOW_FIRST, DESTROYED]), data).chosen == 0


def test_verify_refuses_bad_input(case) -> None:
    _, qm, data = case
    cs = _set(qm, [HIGH])
    with pytest.raises(ArgumentError, match="max_batches must be None or an integer >= 1"):
        fxmpq.verify(qm, cs, data, max_batches=0)
    with pytest.raises(ArgumentError, match="go together"):
        fxmpq.verify(qm, cs, data, max_drop=0.01)
    with pytest.raises(ArgumentError, match="non-empty CandidateSet"):
        fxmpq.verify(qm, [Policy(HIGH)], data)
    with pytest.raises(ArgumentError, match="jointly trained QuantModel"):
        fxmpq.verify(nn.Linear(8, 4), cs, data)
    fxmpq.apply_policy(qm, Policy(HIGH), torch.randn(2, 8))
    with pytest.raises(PolicyError, match="already applied"):
        fxmpq.verify(qm, cs, data)


def test_measured_indicators_find_the_destroyed_layer(case) -> None:
    _, qm, data = case
    ind = fxmpq.measured_indicators(qm, data, batches=2)
    assert qm.policy is None
    assert ind.weight["fc2"][2] == max(v for row in ind.weight.values() for v in row.values())
    assert ind.weight["fc2"][2] > 10 * ind.weight["fc1"][2]
    for table in (ind.weight, ind.act):
        for row in table.values():
            vals = [row[b] for b in sorted(row)]
            assert all(v > 0 for v in vals) and vals == sorted(vals, reverse=True)  # non-increasing in the bits
    back = Indicators.from_json(ind.to_json())
    assert back == ind and back.meta["source"] == "fxmpq.measured_indicators" and "reference_loss" in back.meta
    # the search uses them unchanged, and keeps the destroyed layer off 2 bits
    limit = qm.analysis.cost(Policy(DESTROYED))["size"]
    res = fxmpq.search(qm.analysis, ind, {"size": limit}, alpha=1.0)
    assert res.policy["fc2"][0] != 2


def test_kl_sensitivities_find_the_destroyed_layer(case) -> None:
    """metric="kl": the outputs' KL divergence from the reference model's, per sample (never negative)."""
    _, qm, data = case
    ind = fxmpq.measured_indicators(qm, data, batches=2, metric="kl")
    assert ind.meta["metric"] == "kl" and "KL divergence" in ind.meta["method"]
    assert ind.weight["fc2"][2] == max(v for row in ind.weight.values() for v in row.values())
    assert ind.weight["fc2"][2] > 3 * ind.weight["fc1"][2]  # near-uniform outputs of a random MLP: small KLs
    loss = fxmpq.measured_indicators(qm, data, batches=2)
    assert loss.meta["metric"] == "loss" and ind != loss


def test_measured_indicators_refuse_bad_input(case) -> None:
    _, qm, data = case
    with pytest.raises(ArgumentError, match="metric='mse': expected 'loss'"):
        fxmpq.measured_indicators(qm, data, metric="mse")
    with pytest.raises(ArgumentError, match="batches must be an integer >= 1"):
        fxmpq.measured_indicators(qm, data, batches=0)
    with pytest.raises(ArgumentError, match="jointly trained QuantModel"):
        fxmpq.measured_indicators(Mlp(), data)


def test_measured_rows_continue_by_the_noise_model_where_nothing_is_resolved() -> None:
    """Increases within 2 standard errors of zero say nothing: above the highest resolved bit the row falls 4x per
    bit (never a flat floor that makes the lower bits free), ties break toward more bits, a row with nothing
    resolved starts at its lowest bit's noise level."""
    from fxmpq.policy_search.sensitivity import repair_row

    row = {2: (1.0, 0.1), 3: (0.3, 0.05), 4: (0.01, 0.02), 6: (-0.02, 0.02), 8: (0.0, 0.0)}
    out = repair_row(row, floor=1e-9)
    assert out[2] == 1.0 and out[3] == 0.3  # resolved: the measurement itself
    assert out[4] == pytest.approx(0.3 / 4) and out[6] == pytest.approx(0.3 / 64) and out[8] == pytest.approx(0.3 / 1024)
    tied = repair_row({2: (0.5, 0.1), 3: (0.4, 0.1), 4: (0.6, 0.1), 8: (0.0, 0.0)}, floor=1e-9)
    assert tied[4] == 0.6 and tied[3] == pytest.approx(0.6 * 1.01) and tied[2] == pytest.approx(0.6 * 1.01 ** 2)
    none = repair_row({2: (0.01, 0.05), 4: (-0.01, 0.05), 8: (0.0, 0.0)}, floor=1e-9)
    assert none[2] == pytest.approx(0.1) and none[4] == pytest.approx(0.1 / 16) and none[8] == pytest.approx(0.1 / 4 ** 6)
    assert repair_row({2: (0.0, 0.0), 8: (0.0, 0.0)}, floor=1e-6) == {2: 1e-6, 8: 1e-6}  # no noise known: the floor
