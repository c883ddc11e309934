"""Modules that simulate in PyTorch what ONNX Runtime's integer kernels compute, so parity holds bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from .primitives import round_to_grid

__all__ = ["BiasRounding"]


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
            shape = [1] * y.dim()
            shape[self.channel_axis] = ch
            rounded = y + (b_int * b_scale - b).reshape(shape).to(y.dtype)
            if s_out is None:
                return rounded
            # the integer kernel: acc (exact integer sum + int32 bias) * M, M = s_x * s_w / s_out (float32),
            # rounded half to even; the following quantizer recovers n exactly from n * s_out
            acc = round_to_grid(y.float() - b.reshape(shape), b_scale.reshape(shape)) + b_int.reshape(shape)
            so = s_out.detach().float().reshape(())
            m = (sx * scale) / so
            n = torch.round(acc * m.reshape(shape))  # requantization: a multiply, not a division
            out = (n * so).to(y.dtype)
            if ready is not None:  # the output quantizer has no step size yet (its first batch): do not use it
                out = torch.where(ready, out, rounded)
        return out
