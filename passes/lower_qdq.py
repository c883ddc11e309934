"""LowerToQDQPass: rewrite a fixed QuantModel graph into integer weights, int32 biases and QDQ custom ops."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxmpq.errors import ExportError
from fxmpq.graph import as_input_tuple
from fxmpq.quant import LSQQuantizer

from .apply_policy import BiasRounding, linear_runs_as_conv, relu_bounds
from .base import PassBase, PassResult

log = logging.getLogger(__name__)

__all__ = ["DQ_OP", "LOWERED", "QDQ_OP", "LayerLowering", "LowerToQDQPass", "dequantize", "quantize_dequantize"]

LOWERED = "fxmpq_lowered"  # container module of the integer buffers
QDQ_META = "fxmpq_qdq"  # node.meta key: the quantizer qualname a quantize_dequantize node came from
_INT32 = 2**31 - 1


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fxmpq_qdq::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """ONNX QuantizeLinear(uint8) -> Clip(qmin, qmax) -> DequantizeLinear; qmin/qmax include the zero point."""
    q = torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax)
    return q.sub_(zero_point).mul_(scale)


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


QDQ_OP = torch.ops.fxmpq_qdq.quantize_dequantize.default
DQ_OP = torch.ops.fxmpq_qdq.dequantize.default


# ----------------------------------------------------------------------------------------------- the pass
@dataclass(frozen=True)
class LayerLowering:
    """What lowering did to one conv/linear: its bits, integer range, folded BN, and buffer names."""

    name: str
    w_bits: int | None
    a_bits: int | None
    qrange: tuple[int, int] | None
    params: int
    bn_folded: bool
    int_bias: bool
    weight_buffer: str | None
    as_conv: bool = False
    notes: tuple[str, ...] = field(default=())


_CONV_FN = {1: F.conv1d, 2: F.conv2d}


def _mangle(name: str) -> str:
    return name.replace(".", "_").replace("#", "_call")


def _bn_module(m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        return m
    if hasattr(m, "bns") and hasattr(m, "current"):
        return m.current()
    return None


class LowerToQDQPass(PassBase):
    """Rewrite a QuantModel graph (after ApplyPolicyPass, in eval mode) into a deployable QDQ graph.

    - every active activation LSQQuantizer becomes `quantize_dequantize` (uint8; signed b-bit grids use zero
      point 128 and clip to 128 +/- 2^(b-1)); a ReLU/ReLU6/Hardtanh whose only user is the quantizer is folded
      into the integer clip bounds exactly (rounding is monotone, so round(min(x, 6)/s) = min(round(x/s),
      round(6/s)));
    - every quantized conv/linear gets its weight as int8 integers (the quantizer's own
      clamp(round(w/s))) -> `dequantize` per output channel; a BatchNorm after it is folded exactly into the
      per-channel scale (s_w * gamma/sqrt(var+eps), negative factors give negative scales, integers stay
      untouched) and the bias; the bias becomes int32 with scale s_x * s_w when the input is quantized;
    - a Linear is emitted as a 1x1 convolution on [N*, K, 1, 1] (all leading dimensions folded into the
      batch, restored after its ReLU and output quantizer): ONNX Runtime fuses QDQ Conv into QLinearConv with
      its int32 bias, but not QDQ Gemm, nor a MatMul followed by a bias Add.
    Unsupported situations (weights over 8 bits, per-channel activations, a BatchNorm shared with another
    consumer) raise ExportError naming the node. `example_inputs` (optional) refreshes shape metadata.
    """

    def __init__(self, *, example_inputs: Any = None):
        super().__init__()
        self.example_inputs = example_inputs
        self.layers: list[LayerLowering] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        if gm.training:
            raise ExportError("LowerToQDQPass needs the model in eval mode (BatchNorm running statistics): "
                              "call .eval() first")
        if self.example_inputs is not None:
            with torch.no_grad():
                ShapeProp(gm).propagate(*as_input_tuple(self.example_inputs))
        if not hasattr(gm, LOWERED):
            gm.add_module(LOWERED, nn.Module())
        self.layers = []
        for node in list(gm.graph.nodes):  # the int32 bias realises what BiasRounding simulates
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), BiasRounding):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        for node in list(gm.graph.nodes):
            layer = self._layer(gm, node)
            if layer is not None:
                self.layers.append(self._lower_layer(gm, node, *layer))
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), LSQQuantizer):
                self._lower_act(gm, node)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        self._drop_unused_attrs(gm)
        return PassResult(gm, True)

    # ------------------------------------------------------------------ layers
    @staticmethod
    def _layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, torch.Tensor, torch.Tensor | None,
                                                           LSQQuantizer | None, dict[str, Any]] | None:
        """(name, float weight, bias, weight quantizer, conv options) when `node` is a conv/linear call."""
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            wq = getattr(m, "weight_quantizer", None)
            if isinstance(m, nn.Conv1d | nn.Conv2d):
                if m.padding_mode != "zeros":
                    raise ExportError(f"node {node.format_node()}: padding_mode={m.padding_mode!r} has no QDQ "
                                      f"lowering; use padding_mode='zeros'")
                opts = dict(dim=m.weight.dim() - 2, stride=m.stride, padding=m.padding, dilation=m.dilation,
                            groups=m.groups)
                return node.target, m.weight, m.bias, wq, opts
            if isinstance(m, nn.Linear):
                return node.target, m.weight, m.bias, wq, {"dim": 0}
            return None
        if node.op != "call_function" or node.target not in (F.conv1d, F.conv2d, F.linear, torch.conv1d,
                                                             torch.conv2d):
            return None
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        args = dict(zip(names, node.args))
        args.update(node.kwargs)
        w = args.get("weight")
        wq = None
        if isinstance(w, fx.Node) and w.op == "call_module" and isinstance(gm.get_submodule(w.target), LSQQuantizer):
            wq = gm.get_submodule(w.target)
            w = w.args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        weight = gm.get_parameter(w.target) if w.target in dict(gm.named_parameters()) else gm.get_buffer(w.target)
        b = args.get("bias")
        bias = None
        if isinstance(b, fx.Node):
            if b.op != "get_attr":
                raise ExportError(f"node {node.format_node()}: the bias must be a parameter to lower it")
            bias = getattr(gm.get_submodule(b.target.rpartition(".")[0]) if "." in b.target else gm,
                           b.target.rpartition(".")[2])
        name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
        if node.target in (F.linear,):
            return name, weight, bias, wq, {"dim": 0}
        opts = dict(dim=weight.dim() - 2, stride=args.get("stride", 1), padding=args.get("padding", 0),
                    dilation=args.get("dilation", 1), groups=args.get("groups", 1))
        return name, weight, bias, wq, opts

    def _lower_layer(self, gm: fx.GraphModule, node: fx.Node, name: str, weight: torch.Tensor,
                     bias: torch.Tensor | None, wq: LSQQuantizer | None, opts: dict[str, Any]) -> LayerLowering:
        g = gm.graph
        x = node.args[0] if node.args else node.kwargs["input"]
        if wq is None or wq.active_bits is None:
            log.info("layer %s has no active weight quantizer: left in float", name)
            return LayerLowering(name, None, None, None, weight.numel(), False, False, None)
        b = wq.active_bits
        if b > 8:
            raise ExportError(f"layer {name} (node {node.name}): {b}-bit weights do not fit the INT8 "
                              f"initializers the QDQ lowering emits; use at most 8 bits")
        if opts.get("dim", 0) not in (0, 1, 2):
            raise ExportError(f"node {node.format_node()}: only Conv1d/Conv2d/Linear have a QDQ lowering")
        qmin, qmax = wq.qrange(b)
        out_ch = weight.shape[0]
        with torch.no_grad():
            s_w = wq.step_size(b).detach().float()
            s_b = s_w.reshape([-1] + [1] * (weight.dim() - 1)) if s_w.dim() else s_w
            q_w = torch.div(weight.detach().float(), s_b).clamp_(qmin, qmax).round_()
            scale = s_w.expand(out_ch).clone() if s_w.dim() == 0 else s_w.clone()
            b_f = bias.detach().float().clone() if bias is not None else torch.zeros(out_ch)
        # BatchNorm right after the layer (its only user) folds into the per-channel scale and the bias
        bn_folded = False
        users = list(node.users)
        out = node
        if len(users) == 1 and users[0].op == "call_module":
            bn = _bn_module(gm.get_submodule(users[0].target))
            if bn is not None:
                if bn.training:
                    raise ExportError(f"node {users[0].name}: BatchNorm in training mode; call .eval() first")
                with torch.no_grad():
                    inv = torch.rsqrt(bn.running_var.float() + bn.eps)
                    f = inv * (bn.weight.float() if bn.weight is not None else 1.0)
                    shift = bn.bias.float() if bn.bias is not None else torch.zeros(out_ch)
                    b_f = (b_f - bn.running_mean.float()) * f + shift
                    scale = scale * f
                out = users[0]
                bn_folded = True
        per_tensor = s_w.dim() == 0 and not bn_folded
        # input activation scale (from the act quantizer feeding the layer, if any)
        s_x = None
        if isinstance(x, fx.Node) and x.op == "call_module":
            aq = gm.get_submodule(x.target)
            if isinstance(aq, LSQQuantizer) and aq.active_bits is not None:
                s_x = float(aq.step_size().detach().float())
        mname = _mangle(name)
        holder = gm.get_submodule(LOWERED)
        is_linear = opts["dim"] == 0
        rank = None
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            rank = len(tm.shape)
        as_conv = is_linear and linear_runs_as_conv(node)
        holder.register_buffer(f"{mname}_weight", (q_w[:, :, None, None] if as_conv else q_w).to(torch.int8))
        holder.register_buffer(f"{mname}_weight_scale", (scale[0].clone() if per_tensor else scale).contiguous())
        int_bias = False
        if s_x is not None:
            with torch.no_grad():
                b_scale = (scale * s_x).float()
                b_int = torch.round(b_f / b_scale)
            if bool((b_int.abs() > _INT32).any()) or not bool(torch.isfinite(b_int).all()):
                raise ExportError(f"layer {name}: the bias does not fit int32 at scale s_x*s_w; "
                                  f"the input step size is probably degenerate")
            holder.register_buffer(f"{mname}_bias", b_int.to(torch.int32))
            holder.register_buffer(f"{mname}_bias_scale", b_scale.contiguous())
            int_bias = True
        else:
            holder.register_buffer(f"{mname}_bias", b_f.contiguous())
        with g.inserting_before(node):
            wn = g.get_attr(f"{LOWERED}.{mname}_weight")
            ws = g.get_attr(f"{LOWERED}.{mname}_weight_scale")
            wd = g.call_function(DQ_OP, (wn, ws, 0))
            bn_ = g.get_attr(f"{LOWERED}.{mname}_bias")
            if int_bias:
                bs = g.get_attr(f"{LOWERED}.{mname}_bias_scale")
                bd = g.call_function(DQ_OP, (bn_, bs, 0))
            else:
                bd = bn_
            inp = x
            if as_conv:
                # reshape before the input quantizer (quantization commutes with a reshape)
                k = weight.shape[1]
                if isinstance(x, fx.Node) and x.op == "call_module" and s_x is not None and len(x.users) == 1:
                    src = x.args[0]
                    with g.inserting_before(x):
                        r = g.call_method("reshape", (src, -1, k, 1, 1))
                    x.replace_input_with(src, r)
                    inp = x
                else:
                    inp = g.call_method("reshape", (x, -1, k, 1, 1))
                new = g.call_function(F.conv2d, (inp, wd, bd))
            elif is_linear:
                new = g.call_function(F.linear, (inp, wd, bd))
            else:
                new = g.call_function(_CONV_FN[opts["dim"]], (inp, wd, bd, opts["stride"], opts["padding"],
                                                               opts["dilation"], opts["groups"]))
        result = new
        if as_conv:
            # flatten back after the ReLU and quantizer that follow the layer alone (Conv -> [Relu] -> Q must
            # stay adjacent for ONNX Runtime to fuse them), else right after the layer
            after = out
            while len(after.users) == 1:
                nxt = next(iter(after.users))
                if nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), LSQQuantizer):
                    after = nxt
                    break
                if relu_bounds(gm, nxt) is None:
                    break
                after = nxt
            users_after = list(after.users)
            out.replace_all_uses_with(new)
            src = new if after is out else after
            with g.inserting_after(src):  # [N*, out, 1, 1] back to [N, ..., out] (only the batch is dynamic)
                flat = (g.call_method("flatten", (src, 1)) if rank == 2 else
                        g.call_method("reshape", (src, -1, *tuple(tm.shape[1:-1]), out_ch)))
            for u in users_after:
                u.replace_input_with(src, flat)
        else:
            out.replace_all_uses_with(result)
        if out is not node:
            g.erase_node(out)
        g.erase_node(node)
        notes = () if (as_conv or not is_linear) else ("linear on a 1-D input: float MatMul, not fused",)
        return LayerLowering(name, b, None, (qmin, qmax), weight.numel(), bn_folded, int_bias,
                             f"{LOWERED}.{mname}_weight", as_conv, notes)

    # ------------------------------------------------------------------ activations
    @staticmethod
    def _lower_act(gm: fx.GraphModule, node: fx.Node) -> None:
        g = gm.graph
        q: LSQQuantizer = gm.get_submodule(node.target)
        x = node.args[0]
        if q.active_bits is None:
            node.replace_all_uses_with(x)
            g.erase_node(node)
            return
        b = q.active_bits
        if b > 8:
            raise ExportError(f"quantizer {node.target} (node {node.name}): {b}-bit activations do not fit "
                              f"the uint8 QDQ lowering; use at most 8 bits")
        if q.channels:
            raise ExportError(f"quantizer {node.target} (node {node.name}): per-channel activation "
                              f"quantization has no QDQ lowering")
        qmin, qmax = q.qrange(b)
        zp = 128 if q.signed else 0
        lo, hi = qmin + zp, qmax + zp
        scale = q.step_size(b).detach().float().reshape(())
        if not (bool(torch.isfinite(scale)) and float(scale) > 0):
            raise ExportError(f"quantizer {node.target}: step size {float(scale)} is not a positive number")
        # fold a ReLU/ReLU6/Hardtanh feeding only this quantizer into the integer clip (exact)
        while isinstance(x, fx.Node) and len(x.users) == 1:
            bounds = relu_bounds(gm, x)
            if bounds is None:
                break
            for v, is_lo in ((bounds[0], True), (bounds[1], False)):
                if math.isinf(v):
                    continue
                iv = int(torch.round(torch.tensor(v, dtype=torch.float32) / scale)) + zp
                if is_lo:
                    lo = max(lo, min(iv, hi))
                else:
                    hi = min(hi, max(iv, lo))
            src = x.args[0]
            node.replace_input_with(x, src)
            g.erase_node(x)
            x = src
        attr = f"{_mangle(node.target)}_scale"
        gm.get_submodule(LOWERED).register_buffer(attr, scale.clone())
        with g.inserting_before(node):
            s = g.get_attr(f"{LOWERED}.{attr}")
            new = g.call_function(QDQ_OP, (x, s, zp, lo, hi))
        new.meta[QDQ_META] = node.target
        node.replace_all_uses_with(new)
        g.erase_node(node)

    @staticmethod
    def _drop_unused_attrs(gm: fx.GraphModule) -> None:
        """Remove parameters no node reads (the float weights of lowered layers), so they are not exported."""
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        used_prefixes = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for pname, _ in list(gm.named_parameters()):
            owner = pname.rpartition(".")[0]
            if pname in used or any(owner == p or owner.startswith(p + ".") for p in used_prefixes):
                continue
            mod = gm.get_submodule(owner) if owner else gm
            delattr(mod, pname.rpartition(".")[2])
