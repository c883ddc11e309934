"""LowerToQDQPass: rewrite a fixed QuantModel graph into integer weights, int32 biases and QDQ custom ops.

One pass whose emitters (integer layer, weight-only MatMulNBits, float layer, matmul, the activation quantizers and
the float inputs of float layers) share the record, the BatchNorm fold and the naming of the lowered buffers; the
custom ops live in qdq_ops.py, the storage in fxmpq/quant/storage.py, the ONNX translation in fxmpq/export/lower.py."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmpq.capture.graph import as_input_tuple, constant_value, propagate_shapes
from fxmpq.capture.matcher import bias_arg, emit_call, layer_input, linear_runs_as_conv, weight_arg
from fxmpq.capture.record import (
    LayerRecord,
    Lowered,
    QuantizerRecord,
    quantizer_record_of,
    records,
    set_record,
)
from fxmpq.core.dead_code import eliminate_dead_code
from fxmpq.core.primitives import bias_fits_int32, container_zero_point, quantize, round_to_grid
from fxmpq.errors import ExportError, TraceError
from fxmpq.hardware.formats import Format, act_container_bits, integer_kernel
from fxmpq.hardware.spec import MAX_ACT_BITS, LayerKind
from fxmpq.quant.kernels import AddRounding, BiasRounding, MatMulRounding
from fxmpq.quant.lsq import LSQQuantizer
from fxmpq.quant.storage import NBITS_BLOCK, pack_nbits

from .patterns import bn_module, keeps_grid, layer_weight, relu_bounds
from .qdq_ops import (
    DQ_OP,
    NBITS_OP,
    QDQ_CHANNELS_OP,
    QDQ_OP,
    dequantize,
    quantize_dequantize,
    quantize_dequantize_channels,
)

log = logging.getLogger(__name__)

__all__ = ["DQ_OP", "LOWERED", "NBITS_OP", "QDQ_CHANNELS_OP", "QDQ_OP", "LowerToQDQPass", "dequantize",
           "quantize_dequantize", "quantize_dequantize_channels"]

LOWERED = "fxmpq_lowered"  # container module of the integer buffers
_SIMULATED = (BiasRounding, AddRounding, MatMulRounding)  # PyTorch's stand-ins for ONNX Runtime's integer kernels



# ----------------------------------------------------------------------------------------------- the pass
def _output_bits(gm: fx.GraphModule, out: fx.Node) -> int | None:
    """The bits of the one quantizer that reads `out` (maybe through a ReLU), None when no single one does."""
    x = out
    while len(x.users) == 1:
        nxt = next(iter(x.users))
        if nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), LSQQuantizer):
            return gm.get_submodule(nxt.target).active_bits
        if relu_bounds(gm, nxt) is None:
            return None
        x = nxt
    return None


def _mangle(name: str) -> str:
    return name.replace(".", "_").replace("#", "_call")


def _scale_attr(quantizer: str) -> str:
    """The buffer (under LOWERED) holding a lowered activation quantizer's scale; the audit finds matmuls by it."""
    return f"{_mangle(quantizer)}_scale"


def _following_bn(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, tuple[torch.Tensor, tuple] | None]:
    """(the node whose value the layer's output becomes, BN fold): the BatchNorm that is the layer's only user
    folds as y = (x - mean) * f + beta with f = gamma / sqrt(var + eps); fold = (f, (mean, beta)) or None."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return node, None
    bn = bn_module(gm.get_submodule(users[0].target))
    if bn is None:
        return node, None
    if bn.training:
        raise ExportError(f"node {users[0].name}: BatchNorm in training mode; call .eval() first")
    with torch.no_grad():
        ch = bn.running_mean.shape[0]
        f = torch.rsqrt(bn.running_var.float() + bn.eps) * (bn.weight.float() if bn.weight is not None else 1.0)
        beta = bn.bias.float() if bn.bias is not None else torch.zeros(ch)
    return users[0], (f, (bn.running_mean.float(), beta))


class LowerToQDQPass(PassBase):
    """Rewrite a QuantModel graph (after ApplyPolicyPass, in eval mode) into a deployable QDQ graph.

    - every active activation LSQQuantizer becomes `quantize_dequantize` (uint8 up to 8 bits, uint16 up to 16;
      signed b-bit grids use zero point 128 (32768) and clip to it +/- 2^(b-1)); a ReLU/ReLU6/Hardtanh whose only user is the quantizer is folded
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

    def __init__(self, *, example_inputs: Any = None, accuracy_level: int = 4):
        super().__init__()
        self.example_inputs = example_inputs
        self.accuracy_level = int(accuracy_level)  # MatMulNBits' accuracy_level for weight-only layers

    def requires(self, graph_module: fx.GraphModule) -> None:
        if graph_module.training:
            raise ExportError("LowerToQDQPass needs the model in eval mode (BatchNorm running statistics): "
                              "call .eval() first")
        bare = [r.name for _, r in records(graph_module) if r.applied is None]
        if bare:
            raise ExportError(f"LowerToQDQPass needs a policy applied to every layer; {', '.join(bare[:5])} have "
                              f"none (fxmpq.apply_policy first)")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        left = [n.format_node() for n in graph_module.graph.nodes
                if n.op == "call_module" and isinstance(graph_module.get_submodule(n.target), LSQQuantizer)]
        if left:
            raise ExportError(f"LowerToQDQPass left quantizer calls in the graph: {left[:3]}")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        if self.example_inputs is not None:
            propagate_shapes(gm, as_input_tuple(self.example_inputs))
        layers = list(records(gm))
        quantizers = [n for n in gm.graph.nodes if n.op == "call_module"
                      and isinstance(gm.get_submodule(n.target), (LSQQuantizer, *_SIMULATED))]
        if not layers and not quantizers:
            return PassResult(gm, False)
        if not hasattr(gm, LOWERED):
            gm.add_module(LOWERED, nn.Module())
        for node in quantizers:  # the int32 bias, QLinearAdd and MatMulIntegerToFloat realise what these simulate
            if isinstance(gm.get_submodule(node.target), _SIMULATED):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        eliminate_dead_code(gm.graph)
        for node, rec in layers:
            self._lower_layer(gm, node, rec)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), LSQQuantizer):
                self._lower_act(gm, node)
        for node, rec in list(records(gm)):
            if rec.lowered is not None and rec.lowered.w_bits is None:
                self._float_input(gm, node, rec)
        eliminate_dead_code(gm.graph)
        gm.delete_all_unused_submodules()
        self._drop_unused_attrs(gm)
        return PassResult(gm, True)

    # ------------------------------------------------------------------ layers
    def _lower_layer(self, gm: fx.GraphModule, node: fx.Node, rec: LayerRecord) -> None:
        if rec.kind is LayerKind.MATMUL:
            self._lower_matmul(gm, node, rec)
            return
        g = gm.graph
        name = rec.name
        x = layer_input(node)
        weight = layer_weight(gm, node, rec)
        if rec.conv is not None and rec.conv.padding_mode != "zeros":
            raise ExportError(f"layer {name} (node {node.format_node()}): padding_mode={rec.conv.padding_mode!r} "
                              f"has no QDQ lowering; use padding_mode='zeros'")
        if rec.bias_computed:  # e.g. cat(q_bias, zeros, v_bias): a constant of the model, computed once here
            try:
                bias = constant_value(gm, bias_arg(node), f"layer {name} (node {node.format_node()}): the bias")
            except TraceError as e:  # a capture fact, met while exporting
                raise ExportError(str(e)) from None
        else:
            bias = gm.get_parameter(rec.bias) if rec.bias is not None else None
        wq = gm.get_submodule(rec.sites.weight_quantizer) if rec.sites is not None else None
        applied = rec.applied  # the format comes from the record (ApplyPolicy's); the quantizer must agree with it
        running = wq.active_bits if wq is not None else None
        if running != applied.w_bits:
            now = "is off" if running is None else f"runs at {running} bits"
            raise ExportError(f"layer {name}: its applied policy is {applied.format.value} W{applied.w_bits} but its "
                              f"weight quantizer {now}: the model changed after apply_policy "
                              f"(set_policy or set_uniform); apply the policy again (fxmpq.apply_policy) before lowering")
        if applied.format is Format.FLOAT:
            self._lower_float(gm, node, rec, weight, bias)
            return
        b = applied.w_bits
        if applied.format is Format.WEIGHT_ONLY:
            self._lower_weight_only(gm, node, rec, weight, bias, wq)
            return
        if b > 8:
            raise ExportError(f"layer {name} (node {node.name}): {b}-bit weights do not fit the INT8 "
                              f"initializers the QDQ lowering emits; use at most 8 bits")
        qmin, qmax = wq.qrange(b)
        out_ch = weight.shape[0]
        with torch.no_grad():
            s_w = wq.step_size(b).detach().float()
            s_b = s_w.reshape([-1] + [1] * (weight.dim() - 1)) if s_w.dim() else s_w
            q_w = quantize(weight.detach().float(), s_b, qmin, qmax)
            scale = s_w.expand(out_ch).clone() if s_w.dim() == 0 else s_w.clone()
            b_f = bias.detach().float().clone() if bias is not None else torch.zeros(out_ch)
        # BatchNorm right after the layer (its only user) folds into the per-channel scale and the bias
        bn_folded = False
        out, fold = _following_bn(gm, node)
        if fold is not None:
            f, shift = fold
            b_f = (b_f - shift[0]) * f + shift[1]
            scale = scale * f
            bn_folded = True
        per_tensor = s_w.dim() == 0 and not bn_folded
        after_out = out  # the layer's value once its BatchNorm is folded (the output quantizer reads it)
        # input activation scale (from the act quantizer feeding the layer, if any)
        s_x = a_bits = None
        if isinstance(x, fx.Node) and x.op == "call_module":
            aq = gm.get_submodule(x.target)
            if isinstance(aq, LSQQuantizer) and aq.active_bits is not None:
                s_x = float(aq.step_size().detach().float())
                a_bits = aq.active_bits
        b_int = b_scale = None
        if s_x is not None:
            with torch.no_grad():
                b_scale = (scale * s_x).float()
                b_int = round_to_grid(b_f, b_scale)
            if not bias_fits_int32(b_int):
                # s_x * s_w so small (a degenerate input step) that the bias overflows int32: the layer runs in
                # float on its quantized weights, as BiasRounding simulates it; the audit says it is not as priced
                log.warning("layer %s: its bias does not fit int32 at scale s_x*s_w (input step %.3g): exported "
                            "as a float layer on its quantized weights", name, s_x)
                self._lower_float(gm, node, rec, q_w * s_b, bias,
                                  note="float: the bias does not fit int32 at s_x*s_w")
                return
        mname = _mangle(name)
        holder = gm.get_submodule(LOWERED)
        as_conv = linear_runs_as_conv(rec)
        tm = node.meta.get("tensor_meta")
        out_shape = tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else rec.out_shape
        holder.register_buffer(f"{mname}_weight", (q_w[:, :, None, None] if as_conv else q_w).to(torch.int8))
        holder.register_buffer(f"{mname}_weight_scale", (scale[0].clone() if per_tensor else scale).contiguous())
        int_bias = False
        if b_int is not None:
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
            new = emit_call(g, rec, inp, wd, bd, as_conv2d=as_conv)
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
                flat = (g.call_method("flatten", (src, 1)) if len(out_shape) == 2 else
                        g.call_method("reshape", (src, -1, *out_shape[1:-1], out_ch)))
            for u in users_after:
                u.replace_input_with(src, flat)
        else:
            out.replace_all_uses_with(new)
        if out is not node:
            g.erase_node(out)
        g.erase_node(node)
        notes = () if (as_conv or rec.conv is not None) else ("linear on a 1-D input: float MatMul, not fused",)
        integer = (as_conv or rec.conv is not None) and integer_kernel(b, a_bits, _output_bits(gm, after_out))
        if (as_conv or rec.conv is not None) and not integer and a_bits is not None:
            notes += ("16-bit activations: DequantizeLinear -> float op in ONNX Runtime's CPU provider",)
        set_record(new, dataclasses.replace(rec, lowered=Lowered(
            b, a_bits, (qmin, qmax), bn_folded, int_bias, f"{LOWERED}.{mname}_weight", as_conv, notes=notes,
            integer_kernel=integer)))

    @staticmethod
    def _lower_matmul(gm: fx.GraphModule, node: fx.Node, rec: LayerRecord) -> None:
        """A matmul stays the op it is: its two quantizers become Q/DQ like every activation's (below), which ONNX
        Runtime fuses into MatMulIntegerToFloat (QLinearMatMul when one QuantizeLinear reads the product)."""
        site = rec.sites
        wq = gm.get_submodule(site.weight_quantizer) if site is not None else None
        aq = gm.get_submodule(site.act_quantizer) if site is not None and site.act_quantizer else None
        if wq is None or wq.active_bits is None or aq is None or aq.active_bits is None:
            set_record(node, dataclasses.replace(rec, lowered=Lowered(None, None, None, False, False, None,
                                                                      notes=("float",))))
            return
        w, a = wq.active_bits, aq.active_bits
        integer = integer_kernel(w, a)
        notes = ("MatMulIntegerToFloat",) if integer else (
            "16-bit activations: DequantizeLinear -> float op in ONNX Runtime's CPU provider",)
        set_record(node, dataclasses.replace(rec, lowered=Lowered(
            w, a, None, False, False, None, notes=notes, integer_kernel=integer,
            operand_scale=f"{LOWERED}.{_scale_attr(site.weight_quantizer)}")))

    def _lower_weight_only(self, gm: fx.GraphModule, node: fx.Node, rec: LayerRecord, weight: torch.Tensor,
                           bias: torch.Tensor | None, wq: LSQQuantizer) -> None:
        """A weight-only linear: MatMulNBits on the float input, its packed B holding the LSQ integers exactly
        (q + 2^(b-1), zero point 2^(b-1)), every block's scale the layer's step (per tensor or per output channel,
        times a folded BatchNorm's factor), the bias added inside it."""
        g = gm.graph
        b = wq.active_bits
        if b not in (2, 4, 8):
            raise ExportError(f"layer {rec.name} (node {node.name}): weight-only layers lower to MatMulNBits at 2, 4 "
                              f"or 8 bits, not {b}")
        qmin, qmax = wq.qrange(b)
        out_ch, k = weight.shape
        with torch.no_grad():
            s_w = wq.step_size(b).detach().float()
            q_w = quantize(weight.detach().float(), s_w.reshape(-1, 1) if s_w.dim() else s_w, qmin, qmax)
            scale = s_w.expand(out_ch).clone() if s_w.dim() == 0 else s_w.clone()
            b_f = bias.detach().float().clone() if bias is not None else torch.zeros(out_ch)
        out, fold = _following_bn(gm, node)
        if fold is not None:
            f, shift = fold
            b_f = (b_f - shift[0]) * f + shift[1]
            scale = scale * f
        blocks = -(-k // NBITS_BLOCK)
        mname = _mangle(rec.name)
        holder = gm.get_submodule(LOWERED)
        holder.register_buffer(f"{mname}_weight", pack_nbits(q_w, b, NBITS_BLOCK))
        holder.register_buffer(f"{mname}_weight_scale", scale.repeat_interleave(blocks).contiguous())
        holder.register_buffer(f"{mname}_bias", b_f.contiguous())
        with g.inserting_before(node):
            args = (layer_input(node), g.get_attr(f"{LOWERED}.{mname}_weight"),
                    g.get_attr(f"{LOWERED}.{mname}_weight_scale"), g.get_attr(f"{LOWERED}.{mname}_bias"))
            new = g.call_function(NBITS_OP, (*args, k, out_ch, b, NBITS_BLOCK, self.accuracy_level))
        new.meta.update({key: v for key, v in out.meta.items() if key == "tensor_meta"})
        w_in = weight_arg(node)  # a functional layer's weight quantizer call, dead once the layer is replaced
        out.replace_all_uses_with(new)
        if out is not node:
            g.erase_node(out)
        g.erase_node(node)
        if isinstance(w_in, fx.Node) and not w_in.users:
            g.erase_node(w_in)
        log.info("layer %s lowered weight-only: MatMulNBits %d-bit, block %d", rec.name, b, NBITS_BLOCK)
        set_record(new, dataclasses.replace(rec, lowered=Lowered(
            b, None, (qmin, qmax), fold is not None, False, f"{LOWERED}.{mname}_weight", matmul_nbits=True,
            notes=(f"MatMulNBits {b}-bit, block {NBITS_BLOCK}",))))

    @staticmethod
    def _lower_float(gm: fx.GraphModule, node: fx.Node, rec: LayerRecord, weight: torch.Tensor,
                     bias: torch.Tensor | None, note: str = "float") -> None:
        """A float layer: the same op on float weights, the BatchNorm after it folded in, no Q/DQ around it."""
        g = gm.graph
        out_ch = weight.shape[0]
        with torch.no_grad():
            w = weight.detach().float().clone()
            b_f = bias.detach().float().clone() if bias is not None else torch.zeros(out_ch)
        out, fold = _following_bn(gm, node)
        if fold is not None:
            f, shift = fold
            b_f = (b_f - shift[0]) * f + shift[1]
            w = w * f.reshape([-1] + [1] * (w.dim() - 1))
        mname = _mangle(rec.name)
        holder = gm.get_submodule(LOWERED)
        holder.register_buffer(f"{mname}_weight", w.contiguous())
        holder.register_buffer(f"{mname}_bias", b_f.contiguous())
        with g.inserting_before(node):
            new = emit_call(g, rec, layer_input(node), g.get_attr(f"{LOWERED}.{mname}_weight"),
                            g.get_attr(f"{LOWERED}.{mname}_bias"))
        out.replace_all_uses_with(new)
        if out is not node:
            g.erase_node(out)
        g.erase_node(node)
        log.info("layer %s lowered in float", rec.name)
        set_record(new, dataclasses.replace(rec, lowered=Lowered(None, None, None, fold is not None, False,
                                                                 f"{LOWERED}.{mname}_weight", notes=(note,))))

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
        if b > MAX_ACT_BITS:
            raise ExportError(f"quantizer {node.target} (node {node.name}): {b}-bit activations do not fit "
                              f"the uint16 Q/DQ lowering; use at most {MAX_ACT_BITS} bits")
        if q.channels:
            raise ExportError(f"quantizer {node.target} (node {node.name}): per-channel activation "
                              f"quantization has no QDQ lowering")
        qmin, qmax = q.qrange(b)
        zp = container_zero_point(q.signed, act_container_bits(b))  # uint8 up to 8 bits, uint16 above
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
                iv = int(round_to_grid(torch.tensor(v, dtype=torch.float32), scale)) + zp
                if is_lo:
                    lo = max(lo, min(iv, hi))
                else:
                    hi = min(hi, max(iv, lo))
            src = x.args[0]
            node.replace_input_with(x, src)
            g.erase_node(x)
            x = src
        attr = _scale_attr(node.target)
        gm.get_submodule(LOWERED).register_buffer(attr, scale.clone())
        with g.inserting_before(node):
            s = g.get_attr(f"{LOWERED}.{attr}")
            new = g.call_function(QDQ_OP, (x, s, zp, lo, hi))
        set_record(new, QuantizerRecord(quantizer=node.target))
        node.replace_all_uses_with(new)
        g.erase_node(node)

    @staticmethod
    def _float_input(gm: fx.GraphModule, node: fx.Node, rec: LayerRecord) -> None:
        """A float layer reading a quantized tensor (maybe through max pooling or reshapes, which keep values on the
        grid) reads it through quantize_dequantize_channels, so that ONNX Runtime keeps the layer in float."""
        g = gm.graph
        x = layer_input(node)
        src = x
        while isinstance(src, fx.Node) and not (src.op == "call_function" and src.target is QDQ_OP):
            if not keeps_grid(gm, src):
                return
            src = src.args[0]
        if not isinstance(src, fx.Node):
            return
        axis = 1 if rec.conv is not None else len(rec.in_shape) - 1
        channels = int(rec.in_shape[axis]) if len(rec.in_shape) > axis else 1
        args = (*src.args, axis, channels)
        if x is src and len(src.users) == 1:
            with g.inserting_before(src):
                new = g.call_function(QDQ_CHANNELS_OP, (src.args[0], *args[1:]))
            new.meta.update(src.meta)
            src.replace_all_uses_with(new)
            g.erase_node(src)
            return
        wanted = (x, *args[1:])
        # float layers reading one tensor share one node: ONNX's optimizer would merge identical ones anyway, and
        # the parity diagnosis pairs the graph's quantizer nodes one to one with the ONNX graph's
        new = next((u for u in x.users if u.op == "call_function" and u.target is QDQ_CHANNELS_OP
                    and tuple(u.args) == wanted), None)
        if new is None:
            with g.inserting_before(node):
                new = g.call_function(QDQ_CHANNELS_OP, wanted)
            set_record(new, quantizer_record_of(src))
        node.replace_input_with(x, new)

    @staticmethod
    def _drop_unused_attrs(gm: fx.GraphModule) -> None:
        """Empty the parameters no node reads (the float weights of lowered layers), so they are not exported. The
        attribute stays, as None: code traced through may still read the module (timm's PositionalEncodingFourier
        reads `token_projection.weight.dtype`), and a module missing its `bias` breaks anything that touches it."""
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        used_prefixes = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for pname, _ in list(gm.named_parameters()):
            owner = pname.rpartition(".")[0]
            if pname in used or any(owner == p or owner.startswith(p + ".") for p in used_prefixes):
                continue
            mod = gm.get_submodule(owner) if owner else gm
            mod.register_parameter(pname.rpartition(".")[2], None)
