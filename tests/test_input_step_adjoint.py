"""The model input's quantizer: its step gradient by one forward of the layer (adjoint), the same as through the
layer's input gradient; everything else untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmpq
from fxmpq.quant.lsq import LSQQuantizer, QuantConv1d, QuantConv2d, QuantLinear, without_input_step_adjoint


def _quant_layer(layer: nn.Module) -> tuple[LSQQuantizer, nn.Module]:
    cls = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}[type(layer)]
    q = cls.__new__(cls)
    q.__dict__ = layer.__dict__.copy()
    wq = LSQQuantizer((4,), signed=True, channels=layer.weight.shape[0])
    wq.init_from(layer.weight, reduce=False)
    wq.set_bits(4)
    q.weight_quantizer = wq
    aq = LSQQuantizer((3,), signed=True)
    aq.set_bits(3)
    return aq, q


def _grads(aq: LSQQuantizer, layer: nn.Module, x: torch.Tensor, after, *, adjoint: bool) -> tuple:
    params = [aq.step, layer.weight, layer.weight_quantizer.step] + ([layer.bias] if layer.bias is not None else [])
    for p in params:
        p.grad = None
    ctx = torch.enable_grad() if adjoint else without_input_step_adjoint()
    with ctx:
        y = after(layer(aq(x)), aq(x))
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), [p.grad.clone() for p in params]


CASES = [
    (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3), (4, 3, 20, 20)),
    (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False), (2, 6, 9, 9)),
    (lambda: nn.Conv2d(3, 5, 3, dilation=2, padding_mode="reflect", padding=2), (2, 3, 11, 11)),
    (lambda: nn.Conv1d(4, 7, 5, stride=2), (3, 4, 40)),
    (lambda: nn.Linear(12, 9), (5, 6, 12)),
]


@pytest.mark.parametrize("make,shape", CASES)
@pytest.mark.parametrize("after", ["plain", "inplace_relu", "second_reader"])
def test_adjoint_gives_the_same_gradients(make, shape, after: str) -> None:
    torch.manual_seed(0)
    aq, layer = _quant_layer(make())
    x = torch.randn(*shape)
    aq.init_from(x, reduce=False)
    fn = {"plain": lambda y, xq: y,
          "inplace_relu": lambda y, xq: F.relu(y, inplace=True),  # legal on the layer's output (no view)
          "second_reader": lambda y, xq: y.sum() * 0 + y * 1 + xq.mean() * 3}[after]  # a non-layer reader too
    y1, g1 = _grads(aq, layer, x, fn, adjoint=True)
    y2, g2 = _grads(aq, layer, x, fn, adjoint=False)
    assert torch.equal(y1, y2)
    for a, b in zip(g1[1:], g2[1:]):  # the layer's own gradients: the same operations
        assert torch.equal(a, b)
    assert g2[0].abs().item() > 0
    torch.testing.assert_close(g1[0], g2[0], rtol=1e-4, atol=1e-7)  # a dot product instead of a backward-data sum


def test_adjoint_applies_only_to_an_input_without_gradient_in_training() -> None:
    torch.manual_seed(0)
    aq, layer = _quant_layer(nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    assert hasattr(aq(x), "_fxmpq_input_step")
    assert not hasattr(aq(x.clone().requires_grad_()), "_fxmpq_input_step")  # x's own gradient is needed
    with torch.no_grad():
        assert not hasattr(aq(x), "_fxmpq_input_step")
    aq.eval()
    assert not hasattr(aq(x), "_fxmpq_input_step")
    aq.train()
    with without_input_step_adjoint():
        assert not hasattr(aq(x), "_fxmpq_input_step")
    xr = x.clone().requires_grad_()
    aq(x)  # a tagged output does not change the gradient of an input that needs one
    layer(aq(xr)).sum().backward()
    assert xr.grad is not None and aq.step.grad is not None


def test_prepared_model_trains_the_same_with_and_without_adjoint() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    x = torch.randn(4, 3, 16, 16)
    q = fxmpq.prepare(net, x, bits=(2, 4, 8)).train()
    q.set_uniform(4)
    q(x)

    def grads(adjoint: bool) -> dict[str, torch.Tensor]:
        q.zero_grad(set_to_none=True)
        with (torch.enable_grad() if adjoint else without_input_step_adjoint()):
            F.cross_entropy(q(x), torch.arange(4)).backward()
        return {k: p.grad.clone() for k, p in q.named_parameters() if p.grad is not None}

    def nodes(fn, seen=None) -> set[str]:
        seen = set() if seen is None else seen
        if fn is not None and fn not in seen:
            seen.add(fn)
            for nxt, _ in fn.next_functions:
                nodes(nxt, seen)
        return seen

    assert any("InputStepAdjoint" in type(n).__name__ for n in nodes(q(x).grad_fn))
    with without_input_step_adjoint():
        assert not any("InputStepAdjoint" in type(n).__name__ for n in nodes(q(x).grad_fn))
    a, b = grads(True), grads(False)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert all(k.endswith("input_quantizer.step") for k in differ)  # only the input's step, by rounding
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-8)
