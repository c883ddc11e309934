"""HAWQ-style Hessian indicators: exact traces on a linear chain, the MSE-optimal step, positivity on real nets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _quant_models import FunctionalNet, TinyNet, random_batches
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxmpq
import fxmpq.hardware_specs
from fxmpq.policy_search.hessian import hessian_indicators, mse_step, quantization_error


def _half_sq(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 0.5 * out.pow(2).sum()


def test_traces_match_the_exact_hessian_of_a_linear_chain() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    x = torch.randn(5, 3)
    q = fxmpq.prepare(model, x[:2], bits=(2, 4))
    ind = hessian_indicators(q, [(x, torch.zeros(5))], batches=1, probes=2000, loss_fn=_half_sq)
    w1, w2, w3 = (m.weight.detach() for m in model)
    h = x @ w1.T
    trace_w = float(h.pow(2).sum() * w3.pow(2).sum())  # sum_s |h_s|^2 * |W3|_F^2
    trace_a = float(len(x) * (w3 @ w2).pow(2).sum())  # B * |W3 W2|_F^2
    name = q.searchable_names[0]
    for b in (2, 4):
        wq, aq = q.weight_quantizer(name), q.act_quantizer(name)
        err_w = float(quantization_error(w2, mse_step(w2, *wq.qrange(b)), *wq.qrange(b)))
        err_a = float(quantization_error(h, mse_step(h, *aq.qrange(b)), *aq.qrange(b)))
        assert ind.weight[name][b] == pytest.approx(trace_w / w2.numel() * err_w, rel=0.15)
        assert ind.act[name][b] == pytest.approx(trace_a / h.numel() * err_a, rel=0.15)
    assert ind.meta["source"] == "fxmpq.hessian_indicators"


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 6), signed=st.booleans(), seed=st.integers(0, 10_000))
def test_mse_step_beats_min_max_and_lsq_init(bits: int, signed: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(300, generator=g)
    v = v if signed else v.abs()
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    best = quantization_error(v, mse_step(v, qmin, qmax), qmin, qmax)
    min_max = v.abs().max() / max(-qmin, qmax)
    lsq = 2 * v.abs().mean() / qmax**0.5
    assert best <= quantization_error(v, min_max, qmin, qmax) + 1e-6
    assert best <= quantization_error(v, lsq, qmin, qmax) + 1e-6


def test_weight_indicators_fall_with_the_bits_and_everything_is_restored() -> None:
    torch.manual_seed(0)
    q = fxmpq.prepare(TinyNet(), torch.randn(2, 3, 8, 8), bits=(2, 3, 4))
    q.set_uniform(3)
    q.train()
    ind = hessian_indicators(q, random_batches(3), batches=2, probes=2)
    assert q.policy is not None and q.policy["conv2"] == (3, 3) and q.training
    assert ind.layers == tuple(q.searchable_names) and ind.bits == (2, 3, 4)
    for n in ind.layers:  # signed weight grids nest (b+1 bits contain b bits' points at half the step)
        assert ind.weight[n][2] >= ind.weight[n][3] >= ind.weight[n][4] > 0
        assert all(v > 0 for v in ind.act[n].values())
    res = fxmpq.search(q.analysis, ind, fxmpq.Budget.uniform(3, 3), alpha=1.0)
    assert res.optimal


def test_a_searchable_first_layer_gets_an_activation_indicator(tmp_path: Path) -> None:
    """Unpinned, the first layer's input quantizer reads the model's input, which needs a gradient of its own."""
    hw = (Path(fxmpq.hardware_specs.__file__).parent / "bitops.toml").read_text()
    path = tmp_path / "unpinned.toml"
    path.write_text(hw.replace("first_layer = true", "first_layer = false").replace("last_layer = true", "last_layer = false"))
    torch.manual_seed(0)
    q = fxmpq.prepare(TinyNet(), torch.randn(2, 3, 8, 8), hardware=str(path), bits=(2, 3, 4))
    first = q.searchable_names[0]
    ind = hessian_indicators(q, random_batches(2), batches=1, probes=1)
    assert first in ind.layers and ind.act[first][2] > ind.act[first][4] > 0


def test_functional_layers_and_bad_input() -> None:
    torch.manual_seed(0)
    q = fxmpq.prepare(FunctionalNet(), torch.randn(2, 3, 8, 8), bits=(2, 4))
    ind = hessian_indicators(q, random_batches(2, classes=5), batches=1, probes=1)
    assert set(ind.layers) == set(q.searchable_names)
    with pytest.raises(fxmpq.DataError, match="yielded no batch"):
        hessian_indicators(q, [], batches=1)
    with pytest.raises(fxmpq.DataError, match=r"hessian_indicators: batch 0: expected an \(inputs, targets\) pair"):
        hessian_indicators(q, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(fxmpq.ArgumentError, match="expected a QuantModel"):
        hessian_indicators(FunctionalNet(), [])
