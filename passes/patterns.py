"""Graph patterns the passes share: activation bounds (ReLU/ReLU6/Hardtanh), non-negativity, BN and quantizer nodes."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxmpq.capture.graph import constant_value
from fxmpq.capture.matcher import weight_arg
from fxmpq.capture.record import LayerRecord
from fxmpq.capture.value_ops import (
    MAX_POOL_FUNCTIONS,
    MAX_POOL_MODULES,
    SELECT_FUNCTIONS,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
    SHAPE_MODULES,
)
from fxmpq.quant.kernels import AddRounding, BiasRounding, MatMulRounding
from fxmpq.quant.lsq import LSQQuantizer

__all__ = [
    "add_operands",
    "bn_module",
    "device_of",
    "is_add_rounding",
    "is_bias_rounding",
    "is_bn",
    "is_matmul_rounding",
    "is_max_pool",
    "is_nonnegative",
    "is_quantizer",
    "keeps_grid",
    "layer_weight",
    "relu_bounds",
    "set_submodule",
    "sole_user",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)

_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_PASS_MODULES = (  # sign-preserving: the value ops, averages, interpolation, a quantizer (a grid through zero)
    *MAX_POOL_MODULES, *SHAPE_MODULES, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, LSQQuantizer,
)
_NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax,
                     torch.softmax, torch.abs}
_PASS_FUNCTIONS = {*SELECT_FUNCTIONS, *SHAPE_FUNCTIONS, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, F.interpolate, torch.avg_pool1d}
_ALL_ARGS_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, torch.cat, torch.stack}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "abs", "softmax"}
_PASS_METHODS = {*SHAPE_METHODS, "mean", "max", "__getitem__", "expand", "repeat"}


_GRID_MODULES = MAX_POOL_MODULES + SHAPE_MODULES
_GRID_FUNCTIONS = SHAPE_FUNCTIONS | SELECT_FUNCTIONS
_GRID_METHODS = SHAPE_METHODS


def keeps_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` only moves or selects its first input's values (a quantized tensor stays on its grid)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _GRID_MODULES)
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    return node.op == "call_method" and node.target in _GRID_METHODS


def is_nonnegative(gm: fx.GraphModule, node: fx.Node, _memo: dict[fx.Node, bool] | None = None) -> bool:
    """Whether the graph guarantees `node`'s value is >= 0 (after ReLU/ReLU6/sigmoid, pooling of such, ...).

    Conservative: anything not recognised (placeholders, convs, BN, sums with unknown signs) counts as signed.
    """
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    memo[node] = False  # cycles cannot occur in an fx graph, but keep recursion finite on odd inputs

    def first() -> bool:
        a = node.args[0] if node.args else None
        return isinstance(a, fx.Node) and is_nonnegative(gm, a, memo)

    def every() -> bool:
        items = list(node.args[0]) if node.target in (torch.cat, torch.stack) and node.args else list(node.args)
        nodes = [a for a in items if isinstance(a, fx.Node)]
        consts_ok = all(isinstance(a, int | float) and a >= 0 for a in items if not isinstance(a, fx.Node))
        return bool(nodes) and consts_ok and all(is_nonnegative(gm, a, memo) for a in nodes)

    result = False
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _NONNEG_MODULES):
            result = True
        elif isinstance(m, nn.Hardtanh):
            result = m.min_val >= 0 or first()
        elif isinstance(m, _PASS_MODULES):
            result = first()
    elif node.op == "call_function":
        t = node.target
        if t in _NONNEG_FUNCTIONS:
            result = True
        elif t is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            result = (isinstance(lo, int | float) and lo >= 0) or first()
        elif t in (torch.clamp, torch.clamp_min):
            lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
            result = (isinstance(lo, int | float) and lo >= 0) or first()
        elif t in _PASS_FUNCTIONS:
            result = first()
        elif t in _ALL_ARGS_FUNCTIONS:
            result = every()
    elif node.op == "call_method":
        if node.target in _NONNEG_METHODS:
            result = True
        elif node.target in ("clamp", "clamp_min", "clamp_"):
            lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
            result = (isinstance(lo, int | float) and lo >= 0) or first()
        elif node.target in _PASS_METHODS:
            result = first()
        elif node.target in ("add", "mul", "add_", "mul_"):
            result = every()
    memo[node] = result
    return result


def relu_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) when `node` is a ReLU / ReLU6 / Hardtanh (module, function or method), else None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.ReLU6):
            return 0.0, 6.0
        if isinstance(m, nn.ReLU):
            return 0.0, float("inf")
        if isinstance(m, nn.Hardtanh):
            return float(m.min_val), float(m.max_val)
        return None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return 0.0, float("inf")
        if node.target is F.relu6:
            return 0.0, 6.0
        if node.target is F.hardtanh:
            args = [*list(node.args[1:]), None, None]
            lo = node.kwargs.get("min_val", args[0] if args[0] is not None else -1.0)
            hi = node.kwargs.get("max_val", args[1] if args[1] is not None else 1.0)
            return float(lo), float(hi)
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, float("inf")
    return None


def is_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    m = gm.get_submodule(node.target)
    return isinstance(m, _BN_TYPES) or hasattr(m, "bns")


def bn_module(m: nn.Module) -> nn.Module | None:
    """The BatchNorm a module runs now (a switchable BN's current one), or None when it is not a BatchNorm."""
    if hasattr(m, "bns") and hasattr(m, "current"):
        m = m.current()
    return m if isinstance(m, _BN_TYPES) else None


def device_of(gm: fx.GraphModule) -> torch.device:
    """The device of the graph module's first parameter (CPU without parameters)."""
    p = next(gm.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def is_matmul_rounding(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` calls a MatMulRounding module."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), MatMulRounding)


def is_bias_rounding(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` calls a BiasRounding module."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), BiasRounding)


def is_add_rounding(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` calls an AddRounding module."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), AddRounding)




def is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` max-pools one tensor without returning indices (it commutes with rounding to a grid)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, MAX_POOL_MODULES) and not m.return_indices
    if node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS:
        positional = node.args[6] if len(node.args) > 6 else False  # (input, kernel, stride, padding, dilation, ceil)
        return not (node.kwargs.get("return_indices", False) or positional)
    return False


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when `node` computes a + b of two graph tensors (operator / torch.add without alpha / Tensor.add)."""
    is_add = ((node.op == "call_function" and node.target in (operator.add, torch.add))
              or (node.op == "call_method" and node.target == "add"))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` calls an LSQQuantizer."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), LSQQuantizer)


def set_submodule(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    """Put `module` at `qualname` in `gm` (replacing what is there)."""
    parent, _, leaf = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def sole_user(node: fx.Node) -> fx.Node | None:
    """The only user of `node`, or None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def layer_weight(gm: fx.GraphModule, node: fx.Node, rec: LayerRecord) -> torch.Tensor:
    """The layer's float weight: its parameter, or for a weight computed in forward (timm's ScaledStdConv2d) the
    value the graph computes before the layer's weight quantizer (a constant of the model, evaluated in eval mode)."""
    if rec.weight:
        return gm.get_parameter(rec.weight)
    w = weight_arg(node)
    if isinstance(w, fx.Node) and is_quantizer(gm, w):
        w = w.args[0]
    return constant_value(gm, w, f"layer {rec.name} (node {node.name}): the weight")
