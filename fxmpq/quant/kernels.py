"""Modules that simulate in PyTorch what ONNX Runtime's integer kernels compute, so parity holds bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from ..core.primitives import bias_fits_int32, round_to_grid

__all__ = ["AddRounding", "BiasRounding", "MatMulRounding", "fma_float32", "int8_activation_bound"]


class BiasRounding(nn.Module):
    """In eval mode, adds what rounding the (BN-folded) bias to int32 at scale s_x * s_w changes: per channel
    round(b'/S) * S - b' with S = s_w * gamma/sqrt(var+eps) * s_x and b' the folded bias; identity in training.

    The exported QDQ model carries the bias as int32 (ONNX Runtime's integer kernels need it), so with this
    node the PyTorch model in eval mode computes what the exported model computes. The tensors arrive as
    graph inputs (get_attr of the layer's and BatchNorm's own parameters), so nothing is stored twice.
    """

    def __init__(self, *, channel_axis: int, eps: float | None):
        super().__init__()
        self.channel_axis = channel_axis
        self.eps = eps

    def forward(self, y: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor, s_out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
                ready: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            return y
        with torch.no_grad():
            ch = y.shape[self.channel_axis]
            s_w = s_w.detach().float().reshape(-1).expand(ch)
            b = bias.detach().float() if bias is not None else torch.zeros(ch, device=y.device)
            scale = s_w
            if mean is not None and var is not None and self.eps is not None:
                f = torch.rsqrt(var.float() + self.eps)
                if gamma is not None:
                    f = f * gamma.detach().float()
                b = (b - mean.float()) * f + (beta.detach().float() if beta is not None else 0.0)
                scale = scale * f
            sx = s_x.detach().float().reshape(())
            b_scale = scale * sx
            b_int = round_to_grid(b, b_scale)
            if not bias_fits_int32(b_int):  # the export runs this layer in float (passes/lower_qdq.py)
                return y
            shape = [1] * y.dim()
            shape[self.channel_axis] = ch
            if ready is not None and bool(ready):  # the output quantizer has its step (every batch after the
                ready = None                        # first): no float fallback to compute and discard
            if s_out is None or ready is not None:
                rounded = y + (b_int * b_scale - b).reshape(shape).to(y.dtype)
                if s_out is None:
                    return rounded
            # the integer kernel: acc (exact integer sum + int32 bias) * M, M = s_x * s_w / s_out (float32),
            # rounded half to even; the following quantizer recovers n exactly from n * s_out. The same
            # operations in the same order as round(round((y - b) / S) + b_int) * M) * s_out, in place
            so = s_out.detach().float().reshape(())
            m = (sx * scale) / so
            out = torch.sub(y.float(), b.reshape(shape)).div_(b_scale.reshape(shape)).round_().add_(b_int.reshape(shape))
            out = out.mul_(m.reshape(shape)).round_().mul_(so).to(y.dtype)  # requantization: a multiply
            if ready is not None:  # the output quantizer has no step size yet (its first batch): do not use it
                out = torch.where(ready, out, rounded)
        return out


class MatMulRounding(nn.Module):
    """In eval mode, what ONNX Runtime's MatMulIntegerToFloat computes for a matmul of two fake-quantized
    activations (attention's q @ k^T, attn @ v): the exact integer sum times s_a * s_b, float32(A @ B) * (s_a *
    s_b) with A = a / s_a and B = b / s_b the quantizers' integers; identity in training.

    PyTorch's float32 matmul of the dequantized operands rounds every partial sum and differs from that in the last
    bits of most values (measured: 84 % of a 64x96x80 product), which a softmax after it carries to the next
    quantizer as flipped values (swin_v2_t: 14 of its 15 flips after softmax disappear with the logits made equal).
    Matched bit for bit against ONNX Runtime 1.32's MatMulIntegerToFloat, and its QLinearMatMul when a quantizer
    reads the product (tests/test_kernels.py). The integers are summed in float64 (exact for any sum int32 holds).
    """

    def forward(self, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s_a: torch.Tensor,
                s_b: torch.Tensor) -> torch.Tensor:
        if self.training:
            return y
        with torch.no_grad():
            sa, sb = (s.detach().float().reshape(()) for s in (s_a, s_b))
            acc = torch.matmul(round_to_grid(a.detach().float(), sa).double(),
                               round_to_grid(b.detach().float(), sb).double())
            return acc.float().mul_(sa * sb).to(y.dtype)


def fma_float32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x * y + z rounded once to float32 (a fused multiply-add), for float32 x, y, z (broadcastable).

    Computed in float64: the product of two float32 values is exact there, so the float64 sum s carries one
    rounding. Rounding s to float32 is then correct except when s lies exactly halfway between two float32 values
    while the exact sum does not; only those elements (a bit pattern: the 29 mantissa bits float32 drops are
    1000...0; plus float32's subnormal and overflow ranges, checked the long way) get the exact error term
    (TwoSum) and are rounded toward it. Equal to checking every element, at a fraction of the passes.
    """
    p, zd = torch.broadcast_tensors(x.double() * y.double(), z.double())
    s = p + zd
    r = s.float()
    ra = r.abs()
    tie = ((s.view(torch.int64) & 0x1FFFFFFF) == 0x10000000) | ~((ra >= 2.0**-126) & (ra < float("inf")))
    if not bool(tie.any()):
        return r
    idx = tie.nonzero(as_tuple=True)
    ps, zs, ss, rs = p[idx], zd[idx], s[idx], r[idx]
    bb = ss - ps
    err = (ps - (ss - bb)) + (zs - bb)  # ss + err == ps + zs exactly
    d = ss - rs.double()  # exact: rs is within a factor of two of ss
    toward = torch.nextafter(rs, torch.where(d > 0, torch.full_like(rs, float("inf")),
                                             torch.full_like(rs, -float("inf"))))
    mid = (rs.double() + toward.double()) * 0.5
    past = (d != 0) & (ss == mid) & (err * d > 0)  # halfway, the exact value beyond it: the neighbour instead
    r[idx] = torch.where(past, toward, rs)
    return r


def _within(x: torch.Tensor, lo: float, hi: float) -> bool:
    """Whether every element of `x` lies in [lo, hi] (one pass)."""
    mn, mx = torch.aminmax(x)
    return bool((mn >= lo) & (mx <= hi))


class AddRounding(nn.Module):
    """In eval mode, what ONNX Runtime's QLinearAdd computes for a + b requantized to the step s_c; identity in
    training.

    `a` and `b` are fake-quantized tensors (steps s_a, s_b; stored as uint8 with zero points za, zb) and the
    quantizer that reads the sum has step s_c and zero point zc. The exported graph (DQ, DQ -> Add -> Q) runs
    as QLinearAdd, whose CPU kernel (MLAS, this machine's AVX2/AVX-512 path) computes on the uint8 values A, B
    in float32 with fused multiply-adds: n = round_half_even(fma(A, s_a/s_c, fma(B, s_b/s_c, zc - (s_a/s_c * za
    + s_b/s_c * zb)))), saturated to uint8 (matched bit for bit against ONNX Runtime on every pair of uint8
    inputs, tests/test_kernels.py). This node returns (n - zc) * s_c, from which the following quantizer recovers
    n - zc exactly and clamps it to its range (the uint8 saturation or tighter), so the PyTorch model computes
    what the integer kernel computes. Float addition and rounding differs from it near rounding ties.
    """

    def __init__(self, *, zero_points: tuple[int, int, int]):
        super().__init__()
        self.zero_points = tuple(int(z) for z in zero_points)

    def forward(self, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor,
                s_c: torch.Tensor, ready: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            return y
        za, zb, zc = self.zero_points
        with torch.no_grad():
            sa, sb, sc = (s.detach().float().reshape(()) for s in (s_a, s_b, s_c))
            qa = round_to_grid(a.float(), sa) + za  # the uint8 values ONNX Runtime holds
            qb = round_to_grid(b.float(), sb) + zb
            ra, rb = sa / sc, sb / sc
            fixed = zc - (ra * za + rb * zb)
            if qa.numel() > 65536 and _within(qa, 0, 255) and _within(qb, 0, 255):
                # uint8 inputs (always, after 8-bit quantizers): the kernel's value for each of the 65,536 pairs,
                # computed the long way once, then looked up: the same numbers in a fraction of the passes
                grid = torch.arange(256, dtype=torch.float32, device=qa.device)
                inner = fma_float32(grid, rb, fixed.expand(256))  # depends on B alone
                n = torch.round(fma_float32(grid[:, None], ra, inner[None, :].expand(256, 256)))
                table = ((n - zc) * sc).reshape(-1)
                out = table.take(torch.add(qa.mul_(256), qb).long()).to(y.dtype)
            else:
                n = torch.round(fma_float32(qa, ra, fma_float32(qb, rb, fixed.expand_as(qb))))
                out = ((n - zc) * sc).to(y.dtype)
            if ready is not None:  # the quantizer after the sum has no step size yet (its first batch)
                out = torch.where(ready, out, y)
        return out

    def extra_repr(self) -> str:
        return f"zero_points={self.zero_points}"


def int8_activation_bound(x: torch.Tensor, weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """The largest change MatMulNBits at accuracy_level 4 may make to x @ weight.T over fp32 compute, per output.

    ONNX Runtime's CompInt8 path quantizes x per block of `block_size` along K to int8 with scale max|x_blk| / 127
    (round to nearest, so |x - x_q| <= max|x_blk| / 254) and multiplies the integers with the weight's: output n
    moves by at most sum over blocks of max|x_blk| / 254 * sum_{k in blk} |weight[n, k]|. PyTorch simulates fp32
    compute (lower() checks parity at level 0); this bounds what the deployed level-4 file adds.
    """
    k = x.shape[-1]
    pad = -k % block_size
    xa = torch.nn.functional.pad(x.abs().float(), (0, pad)).reshape(*x.shape[:-1], -1, block_size)
    wa = torch.nn.functional.pad(weight.abs().float(), (0, pad)).reshape(weight.shape[0], -1, block_size)
    return torch.einsum("...b,nb->...n", xa.amax(-1) / 254.0, wa.sum(-1))
