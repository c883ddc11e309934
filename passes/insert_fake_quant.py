"""InsertFakeQuantPass: LSQ quantizers on every annotated layer's weight and input, switchable BN after convs."""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmpq.errors import PassError
from fxmpq.graph import find_quantizable_nodes, input_node, quantizable_layers
from fxmpq.quant import (
    QUANT_LAYER_TYPES,
    LSQQuantizer,
    QuantSite,
    SwitchableBatchNorm1d,
    SwitchableBatchNorm2d,
    to_quant_layer,
)

log = logging.getLogger(__name__)

__all__ = ["InsertFakeQuantPass", "is_nonnegative"]

CONTAINER = "fxmpq_quant"

_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_PASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Upsample,
    LSQQuantizer,
)
_NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax,
                     torch.softmax, torch.abs}
_PASS_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, F.dropout, operator.getitem,
                   torch.mean, F.interpolate, torch.max_pool2d, torch.avg_pool1d}
_ALL_ARGS_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, torch.cat, torch.stack}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "abs", "softmax"}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "mean", "permute", "transpose", "squeeze",
                 "unsqueeze", "max", "__getitem__", "expand", "repeat"}


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


def _mangle(name: str) -> str:
    return name.replace(".", "_").replace("#", "_call")


def _set_submodule(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent, _, leaf = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


class InsertFakeQuantPass(PassBase):
    """Quantize each annotated layer's weight and input activation with LSQ quantizers; switch BN after convs.

    Needs AnnotateCostPass's metadata (layer names, pins). Design (the graph keeps the original qualnames):
    a Conv1d/Conv2d/Linear module called once becomes its Quant* subclass (same parameters) owning
    `weight_quantizer`, and gets an `input_quantizer` child that the graph calls as its own node just before
    the layer (one activation quantizer per consuming layer, as the paper does). Functional layers and the
    second and later calls of a shared module get both quantizers under `fxmpq_quant.<mangled name>`, the
    weight quantizer as a node between the weight's get_attr and the call. Searchable layers get one step
    size per candidate bit; pinned layers a single bit (their pin). Activation quantizers are unsigned when
    the graph shows the input is non-negative (`is_nonnegative`), signed otherwise. Each nn.BatchNorm1d/2d
    fed by a searchable layer becomes a Switchable BatchNorm selected by that layer's weight bits. Every
    quantizer starts switched off, so the transformed graph computes what the original does. After the call,
    `.sites` maps each layer name to its QuantSite.
    """

    def __init__(self, *, bits: Sequence[int] = (2, 3, 4, 5, 6), per_channel: bool = False):
        super().__init__()
        self.bits = tuple(sorted({int(b) for b in bits}))
        if not self.bits:
            raise PassError("InsertFakeQuantPass needs at least one candidate bit-width")
        self.per_channel = per_channel
        self.sites: dict[str, QuantSite] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        layers = list(quantizable_layers(gm))
        found = find_quantizable_nodes(gm)
        if found and not layers:
            raise PassError("InsertFakeQuantPass needs layer metadata: run AnnotateCostPass before it")
        by_node = {q.node: q for q in found}
        memo: dict[fx.Node, bool] = {}
        signed = {}
        for node, _ in layers:
            x = input_node(by_node[node])
            signed[node] = not (x is not None and is_nonnegative(gm, x, memo))
        if layers and not hasattr(gm, CONTAINER):
            gm.add_module(CONTAINER, nn.Module())
        self.sites = {}
        swapped: set[str] = set()
        for node, meta in layers:
            q = by_node.get(node)
            if q is None:
                raise PassError(f"annotated node {node.format_node()} is not a quantizable layer any more")
            wbits = (meta.pin_bits[0],) if meta.pinned and meta.pin_bits else self.bits
            abits = (meta.pin_bits[1],) if meta.pinned and meta.pin_bits else self.bits
            channels = q.weight.shape[0] if self.per_channel else None
            wq = LSQQuantizer(wbits, signed=True, channels=channels)
            wq.init_from(q.weight, reduce=False)
            aq = LSQQuantizer(abits, signed=signed[node])
            wq.train(gm.training)
            aq.train(gm.training)
            x = input_node(q)
            if x is None:
                raise PassError(f"layer {meta.name}: cannot find its input activation in {node.format_node()}")
            if node.op == "call_module" and node.target not in swapped and type(q.module) in QUANT_LAYER_TYPES:
                swapped.add(node.target)
                new = to_quant_layer(q.module, wq)
                new.add_module("input_quantizer", aq)
                _set_submodule(gm, node.target, new)
                w_path, a_path = f"{node.target}.weight_quantizer", f"{node.target}.input_quantizer"
                layer_node = node
            else:
                holder = nn.Module()
                holder.add_module("weight_quantizer", wq)
                holder.add_module("input_quantizer", aq)
                base = f"{CONTAINER}.{_mangle(meta.name)}"
                gm.get_submodule(CONTAINER).add_module(_mangle(meta.name), holder)
                w_path, a_path = f"{base}.weight_quantizer", f"{base}.input_quantizer"
                layer_node = self._functional(gm, node, q, w_path)
            with gm.graph.inserting_before(layer_node):
                xq = gm.graph.call_module(a_path, (x,))
            layer_node.replace_input_with(x, xq)
            bn_path = None if meta.pinned else self._switch_bn(gm, layer_node)
            self.sites[meta.name] = QuantSite(meta.name, w_path, a_path, bn_path, meta.pinned,
                                              meta.pin_bits if meta.pinned else None)
        if not layers:
            return PassResult(gm, False)
        gm.graph.lint()
        gm.recompile()
        log.debug("inserted fake-quant on %d layers (%d switchable BN)", len(self.sites),
                  sum(s.batchnorm is not None for s in self.sites.values()))
        return PassResult(gm, True)

    @staticmethod
    def _functional(gm: fx.GraphModule, node: fx.Node, q, w_path: str) -> fx.Node:
        """Route the layer's weight through the quantizer at `w_path`; returns the (maybe new) call node."""
        g = gm.graph
        if node.op == "call_function":
            w_node = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
            with g.inserting_before(node):
                wqn = g.call_module(w_path, (w_node,))
            if "weight" in node.kwargs:
                node.update_kwarg("weight", wqn)
            else:
                node.update_arg(1, wqn)
            return node
        # a second call of a shared module: call it functionally with its own weight quantizer
        m = q.module
        if isinstance(m, nn.Conv1d | nn.Conv2d) and m.padding_mode != "zeros":
            raise PassError(f"layer {q.name}: a shared {type(m).__name__} with padding_mode={m.padding_mode!r} "
                            f"cannot be quantized per call; use one module per call")
        x = node.args[0]
        with g.inserting_before(node):
            w = g.get_attr(f"{node.target}.weight")
            b = g.get_attr(f"{node.target}.bias") if m.bias is not None else None
            wqn = g.call_module(w_path, (w,))
            if isinstance(m, nn.Linear):
                new = g.call_function(F.linear, (x, wqn, b))
            else:
                fn = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
                new = g.call_function(fn, (x, wqn, b, m.stride, m.padding, m.dilation, m.groups))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return new

    def _switch_bn(self, gm: fx.GraphModule, layer_node: fx.Node) -> str | None:
        for user in layer_node.users:
            if user.op != "call_module" or not user.args or user.args[0] is not layer_node:
                continue
            m = gm.get_submodule(user.target)
            if type(m) is nn.BatchNorm2d:
                _set_submodule(gm, user.target, SwitchableBatchNorm2d(m, self.bits))
                return user.target
            if type(m) is nn.BatchNorm1d:
                _set_submodule(gm, user.target, SwitchableBatchNorm1d(m, self.bits))
                return user.target
        return None
