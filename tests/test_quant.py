"""LSQQuantizer and SwitchableBatchNorm: the formula, LSQ gradients, init, switching and fixing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxmpq.errors import PolicyError
from fxmpq.quant.lsq import LSQQuantizer, SwitchableBatchNorm2d, lsq_fake_quant


def _reference(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, g: float) -> torch.Tensor:
    """LSQ as its reference code composes it from autograd ops (grad_scale, clamp, round_pass)."""
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x / s_scaled, qmin, qmax)
    v = (v.round() - v).detach() + v
    return v * s_scaled


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(0.01, 10.0), step=st.floats(1e-3, 2.0))
def test_forward_matches_formula(bits: int, signed: bool, seed: int, scale: float, step: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 4, generator=g) * scale
    q = LSQQuantizer((bits,), signed=signed)
    q.step.data.fill_(step)
    q.initialized.fill_(True)
    q.set_bits(bits)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert q.qrange() == (qmin, qmax)
    s = torch.tensor(step)
    expected = torch.clamp(torch.round(x / s), qmin, qmax) * s
    assert torch.equal(q(x), expected)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 6), signed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gradients_match_lsq_reference(bits: int, signed: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=g)
    up = torch.randn(2, 3, 4, 4, generator=g)
    q = LSQQuantizer((bits,), signed=signed)
    q.init_from(x)
    q.set_bits(bits)
    xa = x.clone().requires_grad_()
    (q(xa) * up).sum().backward()
    qmin, qmax = q.qrange()
    s = q.step.detach()[0, 0].clone().requires_grad_()
    xb = x.clone().requires_grad_()
    (_reference(xb, s, qmin, qmax, 1 / math.sqrt(x.numel() * qmax)) * up).sum().backward()
    assert torch.allclose(xa.grad, xb.grad)
    assert torch.allclose(q.step.grad[0, 0], s.grad, rtol=1e-4, atol=1e-6)


def test_per_channel_matches_formula_and_gradient() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 2, 6).reshape(6, 1, 1, 1)
    q = LSQQuantizer((2, 4), signed=True, channels=6)
    q.init_from(w)
    expected_init = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    assert torch.allclose(q.step_size(4), expected_init)
    q.set_bits(4)
    wa = w.clone().requires_grad_()
    out = q(wa)
    s = q.step_size(4).detach().reshape(6, 1, 1, 1)
    assert torch.equal(out, torch.clamp(torch.round(w / s), -8, 7) * s)
    out.sum().backward()
    sr = q.step_size(4).detach().reshape(6, 1, 1, 1).clone().requires_grad_()
    _reference(w, sr, -8, 7, 1 / math.sqrt(27 * 7)).sum().backward()
    assert torch.allclose(q.step.grad[1], sr.grad.flatten(), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(q.step.grad[0]) == 0  # the inactive bit's step got no gradient


def test_init_is_lsq_for_every_bit_and_off_is_identity() -> None:
    x = torch.randn(100).abs()
    q = LSQQuantizer((2, 3, 4), signed=False)
    assert torch.equal(q(x), x) and not bool(q.initialized)  # off: identity, no init
    q.set_bits(3)
    q(x)
    assert bool(q.initialized)
    for b in (2, 3, 4):
        assert torch.isclose(q.step_size(b), 2 * x.mean() / math.sqrt(2**b - 1))
    assert q.step_size(2) > q.step_size(3) > q.step_size(4)


def test_set_bits_rejects_non_candidates_and_fix_keeps_one_step() -> None:
    q = LSQQuantizer((2, 4, 8), signed=True)
    with pytest.raises(PolicyError, match="bit-width 5 is not one of"):
        q.set_bits(5)
    q.init_from(torch.randn(50))
    s4 = q.step_size(4).item()
    q.fix(4)
    assert q.bits == (4,) and q.active_bits == 4 and q.step.shape == (1, 1)
    assert q.step_size().item() == s4
    with pytest.raises(PolicyError):
        q.step_size(2)


def test_lsq_fake_quant_function_rounds_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    out = lsq_fake_quant(x, torch.tensor(1.0), -8, 7)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_switchable_batchnorm_selects_and_fixes() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    sbn = SwitchableBatchNorm2d(bn, (2, 4))
    x = torch.randn(2, 4, 3, 3)
    sbn.set_bits(2)
    sbn(x)
    assert sbn.bns[0].num_batches_tracked.item() == 1 and sbn.bns[1].num_batches_tracked.item() == 0
    sbn.set_bits(None)
    assert sbn.current() is sbn.bns[1]  # off: the highest bit's BN
    with pytest.raises(PolicyError):
        sbn.set_bits(3)
    sbn.fix(2)
    assert len(sbn.bns) == 1 and sbn.bits == (2,) and sbn.bns[0].num_batches_tracked.item() == 1
