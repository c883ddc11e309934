"""Which ops of a QuantModel's graph compute in float, as another library may round them differently, and which
are exact (data movement, comparisons, single IEEE-754 operations, the quantizers and the integer kernels they
simulate). The noise floor perturbs the float ones (fxmpq.export.noise_floor); the lowering folds constant float
subgraphs into buffers so that both libraries use PyTorch's values (passes/fold_constants.py)."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .kernels import AddRounding, BiasRounding, MatMulRounding
from .lsq import LSQQuantizer

__all__ = ["describe_op", "float_op_nodes", "float_ops_before"]

# exact ops: both libraries compute the same float32 result from the same inputs (data movement, comparisons,
# single IEEE-754 operations); the walk goes through them to their tensor inputs
_MOVE_METHODS = frozenset({
    "reshape", "view", "permute", "transpose", "flatten", "unflatten", "contiguous", "expand", "expand_as", "squeeze",
    "unsqueeze", "unbind", "chunk", "split", "repeat", "roll", "narrow", "select", "clone", "detach", "relu", "relu_", "t",
    "clamp", "clamp_", "clip", "neg", "swapaxes", "movedim", "index_select", "masked_fill", "__getitem__",
})
_ARITH_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__sub__",
                            "__mul__", "__truediv__"})
_MOVE_FUNCTIONS = frozenset({
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.t, torch.cat, torch.concat,
    torch.stack, torch.roll, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.narrow, torch.unbind,
    torch.swapaxes, torch.movedim, torch.relu, torch.clamp, torch.clip, torch.neg, operator.neg, torch.index_select,
    F.relu, F.relu6, F.hardtanh, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.pad, F.dropout, torch.maximum, torch.minimum,
})
_ARITH_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                              operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div})
# shape arithmetic: no tensor value flows through these
_SHAPE_FUNCTIONS = frozenset({getattr, len, operator.floordiv, operator.mod, math.prod})
_SHAPE_METHODS = frozenset({"size", "dim", "numel"})
_MOVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Unflatten)
# exact given their inputs: a quantizer, or an integer kernel simulated bit for bit (input 0 is the float value
# the kernel reads: the layer's float accumulation, the float sum)
_KERNEL_MODULES = (LSQQuantizer, AddRounding, BiasRounding, MatMulRounding)


def _kind(gm: fx.GraphModule, n: fx.Node) -> tuple[str, list[Any]]:
    """("source" | "exact" | "float" | "shape", the inputs an exact op's value depends on)."""
    if n.op in ("placeholder", "get_attr", "output"):
        return "source", []
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, LSQQuantizer):
            return "source", []
        if isinstance(mod, MatMulRounding):  # the exact integer product of its two quantized operands
            return "exact", list(n.args[1:3])
        if isinstance(mod, _KERNEL_MODULES):
            return "exact", [n.args[0]]
        if isinstance(mod, _MOVE_MODULES):
            return "exact", [n.args[0]]
        return "float", []
    if n.op == "call_function":
        if n.target in _SHAPE_FUNCTIONS:
            return "shape", []
        if n.target in _MOVE_FUNCTIONS:
            return "exact", [n.args[0]]
        if n.target in _ARITH_FUNCTIONS:
            return "exact", list(n.args[:2])
        return "float", []
    if n.target in _SHAPE_METHODS:
        return "shape", []
    if n.target in _MOVE_METHODS:
        return "exact", [n.args[0]]
    if n.target in _ARITH_METHODS:
        return "exact", list(n.args[:2])
    return "float", []


def float_op_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of `gm` whose float32 result another library may round differently (an op outside the exact set;
    the layers' own float accumulation included)."""
    return [n for n in gm.graph.nodes if _kind(gm, n)[0] == "float"]


def describe_op(gm: fx.GraphModule, n: fx.Node) -> str:
    """How a user finds a float op: a module by its name and class, a function or method by its node."""
    if n.op == "call_module":
        cls = type(gm.get_submodule(str(n.target))).__name__
        return f"{n.target} ({cls}{', its float accumulation' if cls.startswith('Quant') else ''})"
    name = getattr(n.target, "__name__", str(n.target))
    return f"{name} (node {n.name})"


def _nearest_float_ops(gm: fx.GraphModule, start: Any) -> list[str]:
    """The float ops nearest to `start` on its input paths, walking through exact ops, nearest first."""
    found: list[str] = []
    seen: set[fx.Node] = set()
    frontier = [start]
    while frontier:
        nxt: list[Any] = []
        for a in frontier:
            if isinstance(a, list | tuple):
                nxt.extend(a)
                continue
            if not isinstance(a, fx.Node) or a in seen:
                continue
            seen.add(a)
            kind, inputs = _kind(gm, a)
            if kind == "float":
                found.append(describe_op(gm, a))
            elif kind == "exact":
                nxt.extend(inputs)
        frontier = nxt
    return found


def float_ops_before(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """For every activation quantizer called in `gm` (by module name): the nearest float ops whose rounding reaches
    its input, nearest first; empty when its input is computed exactly from the model's inputs and other quantizers'
    values."""
    out: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.args and isinstance(gm.get_submodule(str(n.target)), LSQQuantizer):
            out.setdefault(str(n.target), []).extend(_nearest_float_ops(gm, n.args[0]))
    return {k: tuple(dict.fromkeys(v)) for k, v in out.items()}
