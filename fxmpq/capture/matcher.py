"""The one matcher: what a conv, linear or matmul layer looks like in an fx graph, and how to call one again.

Module calls (nn.Conv1d/Conv2d/Linear and their Quant* twins), functional calls (F.conv1d/conv2d/linear and the
torch.* spellings) with any mix of positional and keyword arguments, and activation-by-activation products
(`a @ b`, torch.matmul/bmm, Tensor.matmul/bmm: attention's Q.K^T and A.V, whose second operand takes the weight's
place): `match` reads them into a LayerRecord, and `layer_input`, `weight_arg`, `set_weight_arg` and `emit_call`
are the only other places that touch those arguments. No other module parses conv, linear or matmul arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..hardware.spec import LayerKind
from .record import ConvOptions, LayerRecord, record_of, set_record
from .value_ops import RESHAPE_METHODS, SHAPE_FUNCTIONS, SHAPE_MODULES

log = logging.getLogger(__name__)

__all__ = ["CONV_MODULES", "LINEAR_MODULES", "bias_arg", "emit_call", "find_layers", "is_matmul", "layer_input",
           "linear_runs_as_conv", "match", "set_weight_arg", "weight_arg"]

CONV_MODULES = (nn.Conv1d, nn.Conv2d)
LINEAR_MODULES = (nn.Linear,)
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, torch.conv1d: 1, torch.conv2d: 2}
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_FN = {1: F.conv1d, 2: F.conv2d}
_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
_MATMUL_METHODS = ("matmul", "bmm")
# ops between two layers that leave them back to back in one format (folded into the first layer or its
# quantizer, or free): BatchNorm, ReLU/ReLU6/Hardtanh, reshapes, dropout, identity. Not max pooling: ONNX Runtime
# decides which side of it the Q/DQ go (a uint8 max pooling in NCHW can cost more than the layers), so it belongs to
# neither layer.
_CHAIN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, *SHAPE_MODULES)
_CHAIN_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.batch_norm, *SHAPE_FUNCTIONS}
_CHAIN_METHODS = {"relu", *RESHAPE_METHODS}


def _is_layer_function(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target in _LINEAR_FUNCTIONS)


def is_matmul(node: fx.Node) -> bool:
    """Whether `node` is a matrix product call (operator, function or method spelling); a layer when `match`
    finds both operands computed from the model's input."""
    return ((node.op == "call_function" and node.target in _MATMUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in _MATMUL_METHODS))


def _other_key(node: fx.Node) -> str:
    return "mat2" if node.target in (torch.bmm, "bmm") else "other"


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _arg_names(node: fx.Node) -> tuple[str, ...]:
    return _LINEAR_ARGS if node.target in _LINEAR_FUNCTIONS else _CONV_ARGS


def layer_input(node: fx.Node) -> fx.Node | None:
    """The fx node whose value is the layer's input activation (module or functional call)."""
    x = _arg(node, 0, "input")
    return x if isinstance(x, fx.Node) else None


def weight_arg(node: fx.Node) -> Any:
    """The weight argument of a functional layer call, the second operand of a matmul (None for a module call)."""
    if is_matmul(node):
        return _arg(node, 1, _other_key(node))
    return _arg(node, 1, "weight") if _is_layer_function(node) else None


def bias_arg(node: fx.Node) -> Any:
    """The bias argument of a functional layer call (None for a module call or no bias)."""
    return _arg(node, 2, "bias") if _is_layer_function(node) else None


def set_weight_arg(node: fx.Node, value: fx.Node) -> None:
    """Replace the weight argument of a functional layer call (a matmul's second operand), in whatever position it
    was given."""
    key = _other_key(node) if is_matmul(node) else "weight"
    if key in node.kwargs:
        node.update_kwarg(key, value)
    else:
        node.update_arg(1, value)


def _shape(node: Any) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else ()


def _tuple(v: Any, dim: int) -> tuple[int, ...] | str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return (v,) * dim
    return tuple(int(x) for x in v)


def _conv_kind(weight_shape: Sequence[int], groups: int) -> LayerKind:
    return LayerKind.DEPTHWISE_CONV if groups > 1 and weight_shape[1] == 1 else LayerKind.CONV


def _macs(kind: LayerKind, weight_shape: Sequence[int], out_shape: Sequence[int], batch: int = 1) -> int:
    """Multiply-accumulates of one call per sample: the call's total divided by the example's batch size (not by
    dimension 0, which holds batch x windows in Swin's attention, batch x tokens after a flatten)."""
    if not out_shape:
        return 0
    total = math.prod(out_shape) * (weight_shape[1] if kind is LayerKind.LINEAR else math.prod(weight_shape[1:]))
    return total // max(batch, 1)


def _batch(gm: fx.GraphModule) -> int:
    """The example's batch size: dimension 0 of the first input (1 without one)."""
    x = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    shape = _shape(x) if x is not None else ()
    return int(shape[0]) if shape else 1


def _param(gm: fx.GraphModule, target: str) -> nn.Parameter | None:
    try:
        p = gm.get_parameter(target)
    except AttributeError:
        return None
    return p if isinstance(p, nn.Parameter) else None


def match(gm: fx.GraphModule, node: fx.Node) -> LayerRecord | None:
    """The structural record of `node` when it is a conv/linear call with a parameter weight, else None.

    The name is the module qualname for a module call and the weight's owner qualname for a functional one
    (`F.linear(x, self.proj.weight)` is "proj"); shapes come from ShapeProp's tensor_meta.
    """
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, CONV_MODULES + LINEAR_MODULES):
            return None
        weight, bias = f"{node.target}.weight", (f"{node.target}.bias" if m.bias is not None else None)
        bias_computed, weight_computed, module, name = False, False, node.target, node.target
        wshape = tuple(m.weight.shape)
        conv = None
        if isinstance(m, CONV_MODULES):
            dim = m.weight.dim() - 2
            conv = ConvOptions(dim, _tuple(m.stride, dim), _tuple(m.padding, dim), _tuple(m.dilation, dim),
                               m.groups, m.padding_mode)
    elif is_matmul(node):
        return _match_matmul(gm, node)
    elif _is_layer_function(node):
        w = _arg(node, 1, "weight")
        if not isinstance(w, fx.Node):
            return None
        module = None
        if w.op == "get_attr" and _param(gm, w.target) is not None:
            weight, wshape, weight_computed = w.target, tuple(_param(gm, w.target).shape), False
            # "proj.weight" -> "proj"; nn.MultiheadAttention's "attn.in_proj_weight" -> "attn.in_proj"
            name = weight.removesuffix("_weight") if weight.endswith(".in_proj_weight") else weight.removesuffix(".weight")
        else:  # computed in forward (timm's ScaledStdConv2d standardizes it): named after the calling module
            weight, wshape, weight_computed = "", _shape(w), True
            if len(wshape) < 2 or w.op == "get_attr" or not _reads_parameter(gm, w):
                return None  # a buffer (a fixed blur kernel) is no learned weight
            name = _owner(node) or w.name
        b = _arg(node, 2, "bias")
        bias_computed = isinstance(b, fx.Node) and not (b.op == "get_attr" and _param(gm, b.target) is not None)
        bias = b.target if isinstance(b, fx.Node) and not bias_computed else None
        conv = None
        if node.target in _CONV_FUNCTIONS:
            dim = _CONV_FUNCTIONS[node.target]
            groups = _arg(node, 6, "groups", 1)
            opts = [_arg(node, i, k, d) for i, k, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))]
            if not isinstance(groups, int) or any(isinstance(o, fx.Node) for o in opts):
                return None
            conv = ConvOptions(dim, _tuple(opts[0], dim), _tuple(opts[1], dim), _tuple(opts[2], dim), groups)
    else:
        return None
    kind = LayerKind.LINEAR if conv is None else _conv_kind(wshape, conv.groups)
    x = layer_input(node)
    out_shape = _shape(node)
    bias_n = 0
    if bias is not None:
        bias_n = _param(gm, bias).numel()
    return LayerRecord(
        name=name, kind=kind, weight=weight, bias=bias, conv=conv, module=module, weight_shape=wshape,
        in_shape=_shape(x), out_shape=out_shape, macs=_macs(kind, wshape, out_shape, _batch(gm)),
        params=math.prod(wshape) + bias_n, input_node=x.name if x is not None else "", bias_computed=bias_computed,
        weight_computed=weight_computed)


def _reads_parameter(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node`'s value is computed from at least one parameter."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr" and _param(gm, n.target) is not None:
            return True
        todo.extend(n.all_input_nodes)
    return False


def _owner(node: fx.Node) -> str:
    """The qualname of the module whose forward made the call (torch.fx's nn_module_stack), "" at the top."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else ""
    return owner if isinstance(owner, str) else ""


def _match_matmul(gm: fx.GraphModule, node: fx.Node) -> LayerRecord | None:
    """A matmul of two computed tensors of rank >= 2 (a parameter operand is a weight, not matched here), named
    `<enclosing module>.matmul` (fx's nn_module_stack); MACs per sample are out elements x the inner size."""
    a, b = layer_input(node), weight_arg(node)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or any(
            x.op == "get_attr" for x in (a, b)):
        return None
    ash, bsh, out = _shape(a), _shape(b), _shape(node)
    if len(ash) < 2 or len(bsh) < 2 or not out:
        return None
    owner = _owner(node)
    return LayerRecord(
        name=f"{owner}.matmul" if owner else "matmul", kind=LayerKind.MATMUL, weight="", bias=None, conv=None,
        module=None, weight_shape=bsh, in_shape=ash, out_shape=out,
        macs=math.prod(out) * int(ash[-1]) // max(_batch(gm), 1), params=0,
        input_node=a.name, other_node=b.name)


def find_layers(gm: fx.GraphModule) -> list[LayerRecord]:
    """Attach a record to every quantizable layer call of `gm` (graph order) and return the records.

    A module called more than once yields one record per call; the second call is named "<qualname>#1", etc.
    A layer whose input does not depend on the model's inputs (e.g. Swin V2's position-bias MLP, which runs on a
    constant coordinate table) is left out: it is a constant a deployed model precomputes, not per-input work.
    """
    found: list[LayerRecord] = []
    seen: dict[str, int] = {}
    live: set[fx.Node] = set()  # nodes whose value depends on a placeholder (graph order is topological)
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in live for a in node.all_input_nodes):
            live.add(node)
        rec = match(gm, node)
        if rec is None:
            continue
        x = layer_input(node)
        if x is None or x not in live or (rec.kind is LayerKind.MATMUL and weight_arg(node) not in live):
            log.info("layer %s reads no model input (a constant): not quantized", rec.name)
            continue
        if rec.weight_computed and weight_arg(node) in live:
            log.info("layer %s: its weight is computed from the input (not a constant): not quantized", rec.name)
            continue
        count = seen.get(rec.name, 0)
        seen[rec.name] = count + 1
        if count:
            rec = dataclasses.replace(rec, name=f"{rec.name}#{count}")
        set_record(node, rec)
        found.append(rec)
    layer_of = {n: r for n in gm.graph.nodes if (r := record_of(n)) is not None}
    for node, rec in list(layer_of.items()):
        src = _through_chain_ops(gm, layer_input(node))
        if src in layer_of:
            new = dataclasses.replace(rec, input_layer=layer_of[src].name)
            set_record(node, new)
            found[found.index(rec)] = new
    return found


def _through_chain_ops(gm: fx.GraphModule, x: fx.Node | None) -> fx.Node | None:
    """The node `x` comes from once BN, ReLU-like and reshaping ops are stepped over (their first argument)."""
    while isinstance(x, fx.Node) and record_of(x) is None:
        if x.op == "call_module":
            chain = isinstance(gm.get_submodule(x.target), _CHAIN_MODULES)
        elif x.op == "call_function":
            chain = x.target in _CHAIN_FUNCTIONS
        else:
            chain = x.op == "call_method" and x.target in _CHAIN_METHODS
        if not chain or not x.args or not isinstance(x.args[0], fx.Node):
            return x
        x = x.args[0]
    return x


def linear_runs_as_conv(rec: LayerRecord) -> bool:
    """Whether a Linear is lowered to a 1x1 convolution (an integer kernel that requantizes its output): when its
    output has rank >= 2. On a 1-D input it stays a float MatMul. The one rule ApplyPolicy and LowerToQDQ share."""
    return rec.conv is None and len(rec.out_shape) >= 2


def emit_call(graph: fx.Graph, rec: LayerRecord, x: Any, weight: Any, bias: Any, *,
              as_conv2d: bool = False) -> fx.Node:
    """A functional call computing `rec`'s layer on `x` with the given weight and bias nodes.

    With `as_conv2d`, a linear layer is emitted as a 1x1 F.conv2d (the caller reshapes its input to [N*, K, 1, 1]).
    """
    if rec.conv is None:
        if as_conv2d:
            return graph.call_function(F.conv2d, (x, weight, bias))
        return graph.call_function(F.linear, (x, weight, bias))
    c = rec.conv
    return graph.call_function(_CONV_FN[c.dim], (x, weight, bias, c.stride, c.padding, c.dilation, c.groups))
