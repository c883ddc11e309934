"""LSQ fake-quantizers with one learnable step size per candidate bit, switchable BatchNorm, Quant* layers."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..core.primitives import FakeQuantizer, fake_quantize, fake_quantize_with_mask, qrange
from ..core.switches import ThreadSwitch
from ..errors import ArgumentError, CheckpointError, PolicyError
from . import fused_cpu

log = logging.getLogger(__name__)

__all__ = [
    "LSQQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "SwitchableBatchNorm1d",
    "SwitchableBatchNorm2d",
    "lsq_fake_quant",
    "without_input_step_adjoint",
]


# ----------------------------------------------------------------------------------------------- the kernel
class _LSQFunction(torch.autograd.Function):
    """q = clamp(round_half_even(x / s), qmin, qmax) * s with LSQ's gradients, in one pass each way.

    Forward divides by s (never multiplies by 1/s) and rounds half to even (torch.round), so ONNX Runtime's
    QuantizeLinear reproduces it bit for bit. Backward: straight-through for round, so dx = dy inside
    [qmin, qmax] and 0 outside; ds = sum(dy * (q - x/s)) inside and dy * qmin/qmax outside, times the LSQ
    gradient scale g. `s` is broadcastable to x (a scalar, or [C, 1, 1, ...] per channel).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: torch.Tensor, g: float, qmin: int, qmax: int) -> torch.Tensor:
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.fused = fused_cpu.usable(x, s)
        if ctx.fused:  # one pass each way; the backward recomputes what it needs from x (fxmpq/quant/fused_cpu.py)
            ctx.g, ctx.qrange = g, (qmin, qmax)
            ctx.save_for_backward(x, s)
            return fused_cpu.fused_forward(x, s, qmin, qmax)
        if not need:
            out, inside = fake_quantize(x, s, qmin, qmax), None
        else:
            out, inside = fake_quantize_with_mask(x, s, qmin, qmax)
        # the output is saved too: the conv/linear after us saves it anyway, so it costs no extra memory;
        # the in-range mask (as x's dtype, so the backward is plain mul/addcmul, measured faster than where)
        # spares the backward a division and two comparisons
        ctx.save_for_backward(x, s, out, inside)
        ctx.g = g
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.fused:
            x, s = ctx.saved_tensors
            grad_x, total = fused_cpu.fused_backward(grad, x, s, *ctx.qrange, ctx.needs_input_grad[0],
                                                     ctx.needs_input_grad[1])
            grad_s = None
            if total is not None:
                grad_s = (total * ctx.g / s.detach().double().reshape(-1)).to(s.dtype).reshape(s.shape)
            return grad_x, grad_s, None, None, None
        x, s, out, inside = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d out/d s = q - x/s inside the range (rounding error), q = qmin/qmax outside; with out = q*s:
            # (out - x)/s inside, out/s outside. The 1/s is applied once, after the reduction.
            diff = torch.addcmul(out, x, inside, value=-1)
            if s.numel() == 1:
                grad_s = torch.dot(diff.reshape(-1), grad.reshape(-1)).mul_(ctx.g).div_(s.reshape(())).reshape(s.shape)
            else:
                dims = [d for d in range(diff.dim()) if s.shape[d] == 1]
                grad_s = diff.mul_(grad).sum(dim=dims, keepdim=True).mul_(ctx.g).div_(s)
        return grad_x, grad_s, None, None, None


def lsq_fake_quant(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization of `x` with step `s` (broadcastable to x) onto the integer grid [qmin, qmax]."""
    return _LSQFunction.apply(x, s, grad_scale, qmin, qmax)


# ----------------------------------------------------------------------------------------------- input steps
class _InputStepAdjoint(torch.autograd.Function):
    """The step gradient of a quantizer on a model input, without the layer's input gradient.

    For xq = fq(x, s) with x needing no gradient (the data), ds = sum(dL/dxq * dxq/ds) needs dL/dxq, which
    costs the layer a backward-data pass (resnet18's 3-channel stem: 6x its forward on CPU, the largest part of
    the fake-quant step's overhead). The layer is linear in its input: sum(layer^T(dy) * G) = sum(dy * layer(G))
    with G = dxq/ds, one forward of the layer (no bias) on G instead. Identity on y, which the layer computed
    from xq detached (marked dirty, not copied, so an in-place op after it stays legal).
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, s: torch.Tensor, x: torch.Tensor, wq: torch.Tensor,
                layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], g: float, qmin: int,
                qmax: int) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, s, wq)
        ctx.layer, ctx.g, ctx.qrange = layer, g, (qmin, qmax)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, wq = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                s_ = s.detach()
                out, inside = fake_quantize_with_mask(x, s_, *ctx.qrange)
                # dxq/ds * s, as _LSQFunction's backward has it: (out - x)/s inside the range, out/s outside
                diff = torch.addcmul(out, x, inside, value=-1)
                del out, inside
                z = ctx.layer(diff, wq.detach())
                grad_s = torch.dot(z.reshape(-1).float(), dy.reshape(-1).float()).mul_(ctx.g).div_(s_.reshape(()).float())
                grad_s = grad_s.to(s.dtype).reshape(s.shape)
        return dy, grad_s, None, None, None, None, None, None


_no_adjoint = ThreadSwitch()


def without_input_step_adjoint() -> AbstractContextManager[None]:
    """Within the block (this thread), a model input's quantizer gets its step gradient through the layer's input
    gradient, as every other quantizer does: the reference the adjoint is tested against."""
    return _no_adjoint.block()


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()))


def _mark_input_step(out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, g: float, qmin: int, qmax: int) -> None:
    """Tag a training-mode quantizer output whose input needs no gradient, for the layer reading it."""
    if x.requires_grad or not s.requires_grad or s.dim() != 0 or _no_adjoint.on or _tracing():
        return
    out._fxmpq_input_step = (x, s, g, qmin, qmax)  # type: ignore[attr-defined]


def _layer_with_input_step(layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                           wq: torch.Tensor, bias: torch.Tensor | None,
                           run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """`run(x, wq, bias)`, through _InputStepAdjoint when x is a tagged input quantizer's output."""
    src = getattr(x, "_fxmpq_input_step", None)
    if src is None or not torch.is_grad_enabled():
        return run(x, wq, bias)
    raw, s, g, qmin, qmax = src
    y = run(x.detach(), wq, bias)
    return _InputStepAdjoint.apply(y, s, raw, wq, layer, g, qmin, qmax)


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average `t` over the processes of the default group (no-op without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


# ----------------------------------------------------------------------------------------------- quantizer
class LSQQuantizer(FakeQuantizer):
    """An LSQ fake-quantizer holding one learnable step size per candidate bit-width.

    `step` is one Parameter of shape [len(bits), channels] (channels = 1 per tensor). `active_bits` selects
    the row in use; None switches the quantizer off (identity). Signed grids are [-2^(b-1), 2^(b-1)-1],
    unsigned ones [0, 2^b-1]. Step sizes start from data, LSQ-style 2*mean|v|/sqrt(qmax) for every candidate
    bit at once (per channel when per-channel): weights when the pass builds the quantizer, activations on
    the first batch they see while quantizing, averaged over processes under torch.distributed. The LSQ
    gradient scale is 1/sqrt(n * qmax) with n the number of elements sharing one step size (the weight's
    per-channel group, or the whole activation batch, as LSQ's reference code does).
    """

    def __init__(self, bits: Sequence[int], *, signed: bool, channels: int | None = None, axis: int = 0):
        super().__init__()
        bits = tuple(sorted({int(b) for b in bits}))
        if not bits or any(b < 1 or b > 16 for b in bits):
            raise ArgumentError(f"LSQQuantizer bit-widths must be integers in 1..16, found {bits}")
        self.bits = bits
        self.signed = bool(signed)
        self.channels = channels
        self.axis = axis
        self.step = nn.Parameter(torch.ones(len(bits), channels or 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.active_bits: int | None = None
        self._seen_init = False

    # ------------------------------------------------------------------ bits
    def qrange(self, b: int | None = None) -> tuple[int, int]:
        """The integer grid (qmin, qmax) at bit-width `b` (default: the active one)."""
        return qrange(self._resolve(b), self.signed)

    def _resolve(self, b: int | None) -> int:
        if b is None:
            if self.active_bits is None:
                raise PolicyError("quantizer is off; name a bit-width")
            return self.active_bits
        if b not in self.bits:
            raise PolicyError(f"bit-width {b} is not one of this quantizer's candidates {self.bits}")
        return b

    def set_bits(self, b: int | None) -> None:
        """Quantize at `b` from now on (a candidate bit-width), or switch off with None."""
        if b is not None:
            self._resolve(int(b))
            b = int(b)
        self.active_bits = b

    def step_size(self, b: int | None = None) -> torch.Tensor:
        """The step size at bit `b` (default the active one): a scalar per tensor, shape [channels] per channel."""
        row = self.step[self.bits.index(self._resolve(b))]
        return row if self.channels else row[0]

    def fix(self, b: int) -> None:
        """Keep only bit `b`: a single-bit quantizer holding b's learned step size, active at b."""
        i = self.bits.index(self._resolve(b))
        self.step = nn.Parameter(self.step.detach()[i : i + 1].clone(), requires_grad=self.step.requires_grad)
        self.bits = (b,)
        self.active_bits = b

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_from(self, v: torch.Tensor, *, reduce: bool = True) -> None:
        """Set every bit's step size to LSQ's 2*mean|v|/sqrt(qmax); mark initialized.

        With `reduce`, the statistic is averaged over the processes of torch.distributed's default group
        (activations see a different batch on each rank); weights are the same everywhere and skip it.
        """
        v = v.detach()
        if self.channels:
            m = v.abs().transpose(0, self.axis).reshape(v.shape[self.axis], -1).mean(dim=1)
        else:
            m = v.abs().mean().reshape(1)
        m = m.to(self.step.dtype).clone()
        if reduce:
            _all_reduce_mean(m)
        m = m.clamp_min(1e-8)
        for i, b in enumerate(self.bits):
            self.step[i].copy_(2 * m / math.sqrt(self.qrange(b)[1]))
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.active_bits
        if b is None:
            return x
        if not self._seen_init:  # a Python flag first: reading the buffer on CUDA would sync every call
            if not bool(self.initialized):
                self.init_from(x)
            self._seen_init = True
        qmin, qmax = self.qrange(b)
        s = self.step[self.bits.index(b)]
        if self.channels:
            n = x.numel() // x.shape[self.axis]
            shape = [1] * x.dim()
            shape[self.axis] = self.channels
            s = s.reshape(shape)
        else:
            n = x.numel()
            s = s.reshape(())
        if not torch.is_grad_enabled():  # inference: the same arithmetic, without the backward's saved mask
            if fused_cpu.usable(x, s):
                return fused_cpu.fused_forward(x, s, qmin, qmax)
            return fake_quantize(x, s, qmin, qmax)
        g = 1.0 / math.sqrt(n * qmax)
        out = _LSQFunction.apply(x, s, g, qmin, qmax)
        if self.training:
            _mark_input_step(out, x, s, g, qmin, qmax)
        return out

    def extra_repr(self) -> str:
        per = f", channels={self.channels}, axis={self.axis}" if self.channels else ""
        return f"bits={self.bits}, signed={self.signed}{per}, active_bits={self.active_bits}"

    # active_bits is plain Python state: keep it in the state_dict so checkpoints restore the switch
    def get_extra_state(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "active_bits": self.active_bits}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        bits = tuple(int(b) for b in state["bits"])
        if bits != self.bits:
            raise CheckpointError(f"checkpoint quantizer has bits {bits}, this one {self.bits} (fix it first)")
        self.active_bits = state["active_bits"]
        self._seen_init = False  # the loaded `initialized` buffer decides again


# ----------------------------------------------------------------------------------------------- switchable BN
class _SwitchableBatchNorm(nn.Module):
    """One BatchNorm per candidate bit, selected by `active_bits` (the weight bits of the conv it follows).

    Each BN starts as a copy of the original one. Switched off (None), it uses the BN of the highest
    candidate bit (the closest to full precision; right after prepare it equals the original BN). `fix(b)`
    keeps `.bns` as a ModuleList with the single entry for b, so state-dict keys stay `<name>.bns.0.*`;
    `.current()` returns the plain nn.BatchNorm in use.
    """

    def __init__(self, bn: nn.Module, bits: Sequence[int]):
        super().__init__()
        self.bits = tuple(sorted({int(b) for b in bits}))
        self.bns = nn.ModuleList(copy.deepcopy(bn) for _ in self.bits)
        self.active_bits: int | None = None

    def set_bits(self, b: int | None) -> None:
        """Use the BN of bit `b` (a candidate), or of the highest bit when None."""
        if b is not None and int(b) not in self.bits:
            raise PolicyError(f"bit-width {b} is not one of this BatchNorm's candidates {self.bits}")
        self.active_bits = None if b is None else int(b)

    def current(self) -> nn.Module:
        """The BatchNorm module in use now."""
        b = self.bits[-1] if self.active_bits is None else self.active_bits
        return self.bns[self.bits.index(b)]

    def fix(self, b: int) -> None:
        """Keep only the BN of bit `b` (as `.bns[0]`)."""
        if b not in self.bits:
            raise PolicyError(f"bit-width {b} is not one of this BatchNorm's candidates {self.bits}")
        self.bns = nn.ModuleList([self.bns[self.bits.index(b)]])
        self.bits = (b,)
        self.active_bits = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.current()(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, active_bits={self.active_bits}"

    def get_extra_state(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "active_bits": self.active_bits}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        bits = tuple(int(b) for b in state["bits"])
        if bits != self.bits:
            raise CheckpointError(f"checkpoint BatchNorm has bits {bits}, this one {self.bits} (fix it first)")
        self.active_bits = state["active_bits"]


class SwitchableBatchNorm2d(_SwitchableBatchNorm):
    """Switchable BatchNorm over nn.BatchNorm2d."""


class SwitchableBatchNorm1d(_SwitchableBatchNorm):
    """Switchable BatchNorm over nn.BatchNorm1d."""


# ----------------------------------------------------------------------------------------------- layers
class QuantConv1d(nn.Conv1d):
    """nn.Conv1d whose weight passes through `weight_quantizer` (an LSQQuantizer) on every call."""

    weight_quantizer: LSQQuantizer

    def _no_bias(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_with_input_step(self._no_bias, x, self.weight_quantizer(self.weight), self.bias,
                                      self._conv_forward)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight passes through `weight_quantizer` (an LSQQuantizer) on every call."""

    weight_quantizer: LSQQuantizer

    def _no_bias(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_with_input_step(self._no_bias, x, self.weight_quantizer(self.weight), self.bias,
                                      self._conv_forward)


class QuantLinear(nn.Linear):
    """nn.Linear whose weight passes through `weight_quantizer` (an LSQQuantizer) on every call."""

    weight_quantizer: LSQQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_with_input_step(F.linear, x, self.weight_quantizer(self.weight), self.bias, F.linear)


QUANT_LAYER_TYPES: Mapping[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


def to_plain_layer(m: nn.Module) -> nn.Module:
    """The plain Conv1d/Conv2d/Linear a Quant* layer was made from (same parameters, no weight quantizer)."""
    cls = next(plain for plain, quant in QUANT_LAYER_TYPES.items() if isinstance(m, quant))
    p = cls.__new__(cls)
    p.__dict__ = m.__dict__.copy()
    p._parameters = dict(m._parameters)
    p._buffers = dict(m._buffers)
    p._modules = {k: v for k, v in m._modules.items() if k not in ("weight_quantizer", "input_quantizer")}
    return p


def to_quant_layer(m: nn.Module, weight_quantizer: LSQQuantizer) -> nn.Module:
    """A Quant* twin of Conv1d/Conv2d/Linear module `m` sharing its parameters, owning `weight_quantizer`."""
    cls = QUANT_LAYER_TYPES[type(m)]
    q = cls.__new__(cls)
    q.__dict__ = m.__dict__.copy()
    q._parameters = dict(m._parameters)
    q._buffers = dict(m._buffers)
    q._modules = dict(m._modules)
    q.weight_quantizer = weight_quantizer
    return q
