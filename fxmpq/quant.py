"""LSQ fake-quantizers with one learnable step size per candidate bit, switchable BatchNorm, and QuantModel."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import PolicyError
from .policy import Policy

if TYPE_CHECKING:
    from .analysis import Analysis

log = logging.getLogger(__name__)

__all__ = [
    "LSQQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantModel",
    "QuantSite",
    "SwitchableBatchNorm1d",
    "SwitchableBatchNorm2d",
    "lsq_fake_quant",
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
        xs = torch.div(x, s)
        c = xs.clamp(qmin, qmax)
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        inside = torch.eq(c, xs, out=torch.empty_like(x)) if need else None  # float mask in one pass
        del xs
        out = c.round_().mul_(s)
        # the output is saved too: the conv/linear after us saves it anyway, so it costs no extra memory;
        # the in-range mask (as x's dtype, so the backward is plain mul/addcmul, measured faster than where)
        # spares the backward a division and two comparisons
        ctx.save_for_backward(x, s, out, inside)
        ctx.g = g
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
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


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average `t` over the processes of the default group (no-op without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


# ----------------------------------------------------------------------------------------------- quantizer
class LSQQuantizer(nn.Module):
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
            raise PolicyError(f"LSQQuantizer bit-widths must be integers in 1..16, found {bits}")
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
        b = self._resolve(b)
        if self.signed:
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        return 0, 2**b - 1

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
            return torch.div(x, s).clamp_(qmin, qmax).round_().mul_(s)
        return _LSQFunction.apply(x, s, 1.0 / math.sqrt(n * qmax), qmin, qmax)

    def extra_repr(self) -> str:
        per = f", channels={self.channels}, axis={self.axis}" if self.channels else ""
        return f"bits={self.bits}, signed={self.signed}{per}, active_bits={self.active_bits}"

    # active_bits is plain Python state: keep it in the state_dict so checkpoints restore the switch
    def get_extra_state(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "active_bits": self.active_bits}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        bits = tuple(int(b) for b in state["bits"])
        if bits != self.bits:
            raise PolicyError(f"checkpoint quantizer has bits {bits}, this one {self.bits} (fix it first)")
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
        self.bns = nn.ModuleList(_copy_module(bn) for _ in self.bits)
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
            raise PolicyError(f"checkpoint BatchNorm has bits {bits}, this one {self.bits} (fix it first)")
        self.active_bits = state["active_bits"]


class SwitchableBatchNorm2d(_SwitchableBatchNorm):
    """Switchable BatchNorm over nn.BatchNorm2d."""


class SwitchableBatchNorm1d(_SwitchableBatchNorm):
    """Switchable BatchNorm over nn.BatchNorm1d."""


def _copy_module(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


# ----------------------------------------------------------------------------------------------- layers
class QuantConv1d(nn.Conv1d):
    """nn.Conv1d whose weight passes through `weight_quantizer` (an LSQQuantizer) on every call."""

    weight_quantizer: LSQQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight passes through `weight_quantizer` (an LSQQuantizer) on every call."""

    weight_quantizer: LSQQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """nn.Linear whose weight passes through `weight_quantizer` (an LSQQuantizer) on every call."""

    weight_quantizer: LSQQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


QUANT_LAYER_TYPES: Mapping[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


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


# ----------------------------------------------------------------------------------------------- QuantModel
@dataclass(frozen=True)
class QuantSite:
    """Where one layer's quantization lives in the graph module (module qualnames)."""

    layer: str
    weight_quantizer: str
    act_quantizer: str
    batchnorm: str | None = None
    pinned: bool = False
    pin_bits: tuple[int, int] | None = None


class QuantModel(nn.Module):
    """A traced model with LSQ quantizers on every quantizable layer, switchable as a whole.

    `.graph_module` is the transformed fx.GraphModule (original module qualnames kept: each Conv/Linear
    module becomes a Quant* subclass owning `weight_quantizer`, and an `input_quantizer` submodule of the
    layer is called as its own node right before it; functional layers get both under `fxmpq_quant.*`).
    `.analysis` prices the layers; `.bits` are the candidate bits; `.layer_names` lists searchable and
    pinned layers in graph order (the analysis names).
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        analysis: Analysis,
        bits: Sequence[int],
        sites: Mapping[str, QuantSite],
        *,
        example_shapes: Sequence[tuple[int, ...]] = (),
    ):
        super().__init__()
        self.graph_module = graph_module
        self.analysis = analysis
        self.bits = tuple(sorted(bits))
        self.sites = dict(sites)
        self.example_shapes = [tuple(s) for s in example_shapes]
        self._policy: Policy | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantModel:
        # Analysis and Policy are immutable values holding MappingProxyType (which deepcopy cannot copy): share
        # them, and point the copy's analysis at the copied graph module.
        memo[id(self.analysis)] = self.analysis
        if self._policy is not None:
            memo[id(self._policy)] = self._policy
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        new.__dict__["analysis"] = dataclasses.replace(self.analysis, graph_module=new.graph_module)
        return new

    # ------------------------------------------------------------------ accessors
    @property
    def layer_names(self) -> list[str]:
        """Searchable and pinned layer names in graph order."""
        return self.analysis.names

    @property
    def searchable_names(self) -> list[str]:
        """Layers whose bits a policy chooses."""
        return [m.name for m in self.analysis.searchable]

    def _site(self, name: str) -> QuantSite:
        try:
            return self.sites[name]
        except KeyError:
            raise PolicyError(f"no quantized layer {name!r}; layers: {', '.join(self.layer_names)}") from None

    def weight_quantizer(self, name: str) -> LSQQuantizer:
        """The weight LSQQuantizer of layer `name`."""
        return self.graph_module.get_submodule(self._site(name).weight_quantizer)

    def act_quantizer(self, name: str) -> LSQQuantizer:
        """The input-activation LSQQuantizer of layer `name`."""
        return self.graph_module.get_submodule(self._site(name).act_quantizer)

    def batchnorm(self, name: str) -> _SwitchableBatchNorm | None:
        """The switchable BatchNorm following layer `name`, or None."""
        bn = self._site(name).batchnorm
        return self.graph_module.get_submodule(bn) if bn else None

    def quantizers(self) -> Iterator[tuple[str, LSQQuantizer]]:
        """(qualname, quantizer) for every LSQQuantizer in the graph module."""
        for n, m in self.graph_module.named_modules():
            if isinstance(m, LSQQuantizer):
                yield n, m

    def step_parameters(self) -> list[nn.Parameter]:
        """Every step-size Parameter (for a separate optimizer group)."""
        return [q.step for _, q in self.quantizers()]

    @torch.no_grad()
    def clamp_step_sizes(self, min_value: float = 1e-8) -> None:
        """Project every step size back to >= min_value (an optimizer step may push a small step negative)."""
        for p in self.step_parameters():
            p.clamp_(min=min_value)

    @property
    def policy(self) -> Policy | None:
        """The complete policy in force (pins included), or None when quantization is off."""
        return self._policy

    # ------------------------------------------------------------------ switching
    def set_policy(self, policy: Policy | Mapping[str, tuple[int, int]]) -> None:
        """Switch every layer to the policy's (w, a) (pins stay at their pins); every step size is kept."""
        policy = policy if isinstance(policy, Policy) else Policy(policy)
        full = policy.complete(self.analysis)
        bad = [f"{n} W{w}A{a}" for n, (w, a) in full.items()
               if not self.sites[n].pinned and (w not in self.weight_quantizer(n).bits
                                                or a not in self.act_quantizer(n).bits)]
        if bad:
            raise PolicyError(f"policy bits outside this model's candidate bits {self.bits}: {', '.join(bad)}")
        self._switch(full)

    def _switch(self, full: Mapping[str, tuple[int, int]]) -> None:
        gm = self.graph_module
        for n, (w, a) in full.items():
            site = self.sites[n]
            gm.get_submodule(site.weight_quantizer).set_bits(w)
            gm.get_submodule(site.act_quantizer).set_bits(a)
            if site.batchnorm:
                gm.get_submodule(site.batchnorm).set_bits(w)
        self._policy = full if isinstance(full, Policy) else Policy(full)

    def set_uniform(self, w_bits: int, a_bits: int | None = None) -> None:
        """Every searchable layer at (w_bits, a_bits) (a_bits defaults to w_bits); pinned layers at their pins."""
        a_bits = w_bits if a_bits is None else a_bits
        if w_bits not in self.bits or a_bits not in self.bits:
            raise PolicyError(f"uniform W{w_bits}A{a_bits} is outside this model's candidate bits {self.bits}")
        full = {m.name: (m.pin_bits if m.pinned else (w_bits, a_bits)) for m in self.analysis.layers}
        self._switch(full)

    def disable_quant(self) -> None:
        """Switch every quantizer off (full precision); switchable BNs use their highest-bit BN."""
        for _, q in self.quantizers():
            q.set_bits(None)
        for m in self.graph_module.modules():
            if isinstance(m, _SwitchableBatchNorm):
                m.set_bits(None)
        self._policy = None

    def fix(self) -> None:
        """Freeze the current policy: every quantizer and switchable BN keeps only its active bit."""
        if self._policy is None:
            raise PolicyError("no policy in force: call set_policy(...) before fix()")
        gm = self.graph_module
        for n, (w, a) in self._policy.items():
            site = self.sites[n]
            gm.get_submodule(site.weight_quantizer).fix(w)
            gm.get_submodule(site.act_quantizer).fix(a)
            if site.batchnorm:
                gm.get_submodule(site.batchnorm).fix(w)

    def quant_state(self) -> dict[str, dict[str, Any]]:
        """Per layer: candidate bits and active bits of its quantizers (JSON-ready, for checkpoints)."""
        out = {}
        for n in self.layer_names:
            wq, aq = self.weight_quantizer(n), self.act_quantizer(n)
            out[n] = {"w_bits": list(wq.bits), "a_bits": list(aq.bits), "w": wq.active_bits, "a": aq.active_bits}
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)
