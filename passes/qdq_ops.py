"""The custom ops a lowered graph calls: quantize-dequantize (per tensor and per channel), dequantize of integer
weights, and weight-only MatMulNBits, registered with torch.library (with fake kernels for tracing) so that
torch.export keeps them as single nodes for the ONNX translation in fxmpq/export/lower.py."""

from __future__ import annotations

import torch

from fxmpq.core.primitives import fake_quantize
from fxmpq.quant.storage import unpack_nbits

__all__ = ["DQ_OP", "NBITS_OP", "QDQ_CHANNELS_OP", "QDQ_OP", "dequantize", "matmul_nbits", "quantize_dequantize",
           "quantize_dequantize_channels"]

# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fxmpq_qdq::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """ONNX QuantizeLinear(uint8) -> Clip(qmin, qmax) -> DequantizeLinear; qmin/qmax include the zero point."""
    return fake_quantize(x, scale, qmin - zero_point, qmax - zero_point)


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("fxmpq_qdq::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX DequantizeLinear of an integer tensor (no zero point), per channel along `axis` when scale is 1-D."""
    s = scale
    if scale.dim() == 1:
        shape = [1] * q.dim()
        shape[axis] = -1
        s = scale.reshape(shape)
    return q.to(torch.float32) * s


@dequantize.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("fxmpq_qdq::quantize_dequantize_channels", mutates_args=())
def quantize_dequantize_channels(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int,
                                 axis: int, channels: int) -> torch.Tensor:
    """quantize_dequantize whose DequantizeLinear carries the (one) scale repeated per channel along `axis`.

    The same values as quantize_dequantize. It feeds float layers: ONNX Runtime (WeightBiasQuantization, 1.20+)
    quantizes the float weights of a Conv/Gemm whose input comes from a per-tensor DequantizeLinear and runs the
    layer as an integer kernel, which is not the float layer the policy asked for; a per-channel scale is outside
    that rewrite.
    """
    return fake_quantize(x, scale, qmin - zero_point, qmax - zero_point)


@quantize_dequantize_channels.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int, axis: int,
      channels: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("fxmpq_qdq::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, k: int, n: int,
                 bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    """com.microsoft MatMulNBits (default zero point 2^(b-1), one scale per output channel and block) plus the bias,
    computed in float: ONNX Runtime's accuracy_level 0 (fp32 compute); level 4 quantizes x per block to int8."""
    q = unpack_nbits(packed, k, bits).to(torch.float32)
    blocks = packed.shape[1]
    s = scales.reshape(n, blocks).repeat_interleave(block_size, dim=1)[:, :k]
    return torch.nn.functional.linear(x, q * s, bias)


@matmul_nbits.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, k: int, n: int,
      bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


QDQ_OP = torch.ops.fxmpq_qdq.quantize_dequantize.default
NBITS_OP = torch.ops.fxmpq_qdq.matmul_nbits.default
QDQ_CHANNELS_OP = torch.ops.fxmpq_qdq.quantize_dequantize_channels.default
DQ_OP = torch.ops.fxmpq_qdq.dequantize.default
