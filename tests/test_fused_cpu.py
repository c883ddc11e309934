"""The fused LSQ CPU kernel (fxmpq/quant/fused_cpu.py) computes what PyTorch's operators compute: the forward and dx
bit for bit, the step gradient to float32 precision and the same whatever the thread count."""

from __future__ import annotations

import logging

import pytest
import torch

from fxmpq.core.primitives import fake_quantize
from fxmpq.quant import fused_cpu
from fxmpq.quant.lsq import lsq_fake_quant

pytestmark = pytest.mark.skipif(fused_cpu.fused_kernel() is None, reason="no C++ toolchain: the PyTorch path serves")

CASES = [((8, 32, 16, 16), (), (0, 255)), ((8, 32, 16, 16), (), (-8, 7)), ((8, 32, 16, 16), (), (0, 65535)),
         ((64, 32, 3, 3), (64, 1, 1, 1), (-2, 1)), ((96, 80), (96, 1), (-128, 127))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize(("shape", "sshape", "qrange"), CASES)
def test_forward_and_dx_are_bit_identical_and_ds_agrees(shape, sshape, qrange):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g) * 0.4
    s0 = torch.rand(sshape, generator=g) * 0.02 + 0.003
    flat = x0.view(-1)
    flat[:4] = torch.tensor([-0.0, 0.0, 1e-30, -1e-30])
    flat[6:406] = (torch.arange(-200, 200).float() + 0.5) * s0.reshape(-1)[0]  # exact halves: ties to even
    dy = torch.randn(shape, generator=g)
    got = []
    for fused in (True, False):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        if fused:
            assert fused_cpu.usable(x, s.reshape(sshape))
            y = lsq_fake_quant(x, s, *qrange, 0.05)
        else:
            with fused_cpu.disabled():
                assert not fused_cpu.usable(x, s)
                y = lsq_fake_quant(x, s, *qrange, 0.05)
        y.backward(dy)
        got.append((y.detach(), x.grad, s.grad))
    (y1, dx1, ds1), (y2, dx2, ds2) = got
    assert torch.equal(_bits(y1), _bits(y2))
    assert torch.equal(_bits(y1), _bits(fake_quantize(x0, s0, *qrange)))
    assert torch.equal(_bits(dx1), _bits(dx2))
    assert ds1.shape == ds2.shape == s0.shape
    torch.testing.assert_close(ds1, ds2, rtol=2e-4, atol=1e-6)  # float64 blocks against PyTorch's float32 sum


def test_nan_and_inf_like_pytorch():
    x = torch.randn(8192)
    x[5], x[6], x[7] = float("nan"), float("inf"), -float("inf")
    s = torch.tensor(0.01)
    y = fused_cpu.fused_forward(x, s, -8, 7)
    ref = fake_quantize(x, s, -8, 7)
    assert torch.isnan(y[5]) and torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y[~y.isnan()], ref[~ref.isnan()])


def test_step_gradient_does_not_depend_on_the_thread_count():
    x = torch.randn(4, 64, 40, 40) * 0.3
    s = torch.tensor(0.011)
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out.append(fused_cpu.fused_backward(dy, x, s, -8, 7, True, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_usable_only_where_it_applies():
    s = torch.tensor(0.1)
    assert fused_cpu.usable(torch.randn(64, 64), s)
    assert not fused_cpu.usable(torch.randn(8, 8), s)  # small: PyTorch's operators
    assert not fused_cpu.usable(torch.randn(64, 64).t(), s)  # not contiguous
    assert not fused_cpu.usable(torch.randn(64, 64, dtype=torch.float64), s)
    assert not fused_cpu.usable(torch.randn(64, 64), torch.full((1, 64), 0.1))  # per channel along dim 1
    assert fused_cpu.usable(torch.randn(64, 64), torch.full((64, 1), 0.1))


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(fused_cpu, "_tried", False)
    monkeypatch.setattr(fused_cpu, "_module", None)

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ext, "load_inline", broken)
    with caplog.at_level(logging.WARNING, logger="fxmpq.quant.fused_cpu"):
        assert fused_cpu.fused_kernel() is None
        assert not fused_cpu.usable(torch.randn(64, 64), torch.tensor(0.1))
    assert sum("could not be built" in r.getMessage() for r in caplog.records) == 1
    x = torch.randn(64, 64, requires_grad=True)
    lsq_fake_quant(x, torch.tensor(0.1), -8, 7).sum().backward()  # the PyTorch path
    assert x.grad is not None
