"""The quantization primitives: integer grids, `round(clip(x / s))` and its inverse, in one place for every caller.

Training (the LSQ kernel), bias rounding, the QDQ lowering and the Hessian baseline all quantize with these, so the
PyTorch model, the integer tensors written to ONNX and ONNX Runtime's QuantizeLinear agree bit for bit: divide by the
step (never multiply by its inverse), round half to even (torch.round, as QuantizeLinear does), clip to the grid.
For integer bounds clip-then-round equals round-then-clip, so either order is this same function.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["INT32_MAX", "FakeQuantizer", "bias_fits_int32", "container_zero_point", "fake_quantize", "fake_quantize_with_mask", "qrange", "quantize",
           "round_to_grid"]

INT32_MAX = 2**31 - 1


class FakeQuantizer(nn.Module):
    """The base of fxmpq's quantizer modules, so that capture can refuse a model that already holds quantizers
    without importing the quantization stage above it."""


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid (qmin, qmax) of `bits`-bit values: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """round(clip(x / step, qmin, qmax)): the integers (as x's float dtype) that `x` quantizes to."""
    return torch.div(x, step).clamp_(qmin, qmax).round_()


def fake_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """quantize(...) * step: the value the quantized tensor represents (LSQ's forward, QDQ's round trip)."""
    return quantize(x, step, qmin, qmax).mul_(step)


def round_to_grid(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """round(x / step) without clipping (an int32 bias at scale s_x * s_w, an accumulator)."""
    return torch.round(torch.div(x, step))


def bias_fits_int32(b_int: torch.Tensor) -> bool:
    """Whether a bias rounded to the grid s_x * s_w fits the integer kernels' int32 (finite, |b| <= 2^31 - 1): a
    degenerate input step makes it overflow, and the layer then runs in float (BiasRounding and the lowering agree)."""
    # below 2^31, exact in float32 (INT32_MAX itself rounds up to 2^31 there); NaN and inf compare False: one
    # reduction, so one sync on a GPU
    return bool((b_int.abs() < INT32_MAX + 1).all())


def container_zero_point(signed: bool, container_bits: int = 8) -> int:
    """The zero point that stores a signed grid in an unsigned container (128 for uint8), 0 when unsigned."""
    return 2 ** (container_bits - 1) if signed else 0


def fake_quantize_with_mask(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake_quantize(x), in-range mask as x's dtype) in one pass: LSQ's forward, whose backward needs the mask."""
    xs = torch.div(x, step)
    c = xs.clamp(qmin, qmax)
    inside = torch.eq(c, xs, out=torch.empty_like(x))  # a float mask straight from the comparison
    del xs
    return c.round_().mul_(step), inside
