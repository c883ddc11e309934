"""InsertFakeQuantPass: LSQ quantizers on every annotated layer's weight (a matmul's second operand) and input,
switchable BN after convs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmpq.capture.matcher import emit_call, layer_input, set_weight_arg, weight_arg
from fxmpq.capture.record import LayerRecord, QuantSites, records, set_record
from fxmpq.errors import PassError
from fxmpq.hardware.spec import LayerKind
from fxmpq.quant.lsq import (
    QUANT_LAYER_TYPES,
    LSQQuantizer,
    SwitchableBatchNorm1d,
    SwitchableBatchNorm2d,
    to_quant_layer,
)

from .patterns import is_nonnegative, layer_weight, set_submodule

log = logging.getLogger(__name__)

__all__ = ["InsertFakeQuantPass"]

CONTAINER = "fxmpq_quant"

def _mangle(name: str) -> str:
    return name.replace(".", "_").replace("#", "_call")


class InsertFakeQuantPass(PassBase):
    """Quantize each recorded layer's weight and input activation with LSQ quantizers; switch BN after convs.

    Needs the records AnnotateCostPass wrote (pins). Design (the graph keeps the original qualnames): a
    Conv1d/Conv2d/Linear module called once becomes its Quant* subclass (same parameters) owning
    `weight_quantizer`, and gets an `input_quantizer` child that the graph calls as its own node just before
    the layer (one activation quantizer per consuming layer, as the paper does). Functional layers and the
    second and later calls of a shared module get both quantizers under `fxmpq_quant.<mangled name>`, the
    weight quantizer as a node between the weight's get_attr and the call. Searchable layers get one step
    size per candidate bit; pinned layers a single bit (their pin). Activation quantizers are unsigned when
    the graph shows the input is non-negative (`is_nonnegative`), signed otherwise. Each nn.BatchNorm1d/2d
    fed by a searchable layer becomes a Switchable BatchNorm selected by that layer's weight bits. Every
    quantizer starts switched off, so the transformed graph computes what the original does. Each record
    gets its QuantSites.
    """

    def __init__(self, *, bits: Sequence[int] = (2, 3, 4, 5, 6), per_channel: bool = False,
                 act_bits: Sequence[int] | None = None):
        super().__init__()
        self.bits = tuple(sorted({int(b) for b in bits}))
        self.act_bits = self.bits if act_bits is None else tuple(sorted({int(b) for b in act_bits}))  # default: bits
        if not self.bits or not self.act_bits:
            raise PassError("InsertFakeQuantPass needs at least one candidate bit-width")
        self.per_channel = per_channel

    def requires(self, graph_module: fx.GraphModule) -> None:
        found = list(records(graph_module))
        if any(not r.costs for _, r in found):
            raise PassError("InsertFakeQuantPass needs priced layer records: run AnnotateCostPass before it")
        done = [r.name for _, r in found if r.sites is not None]
        if done:
            raise PassError(f"InsertFakeQuantPass: layer(s) {', '.join(done[:5])} are quantized already (this "
                            f"graph was prepared before); prepare the original model instead")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        missing = [r.name for _, r in records(graph_module) if r.sites is None]
        if missing:
            raise PassError(f"InsertFakeQuantPass left layer(s) {', '.join(missing[:5])} without quantizers")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        layers = list(records(gm))
        if not layers:
            return PassResult(gm, False)
        memo: dict[fx.Node, bool] = {}
        signed, other_signed = {}, {}
        for node, rec in layers:
            x = layer_input(node)
            signed[node] = not (x is not None and is_nonnegative(gm, x, memo))
            if rec.kind is LayerKind.MATMUL:
                other_signed[node] = not is_nonnegative(gm, weight_arg(node), memo)
        if not hasattr(gm, CONTAINER):
            gm.add_module(CONTAINER, nn.Module())
        swapped: set[str] = set()
        for node, rec in layers:
            wbits = (rec.pin_bits[0],) if rec.pinned and rec.pin_bits else self.bits
            abits = (rec.pin_bits[1],) if rec.pinned and rec.pin_bits else self.act_bits
            if rec.kind is LayerKind.MATMUL:  # the second operand: an activation, at the weight candidates
                wq = LSQQuantizer(wbits, signed=other_signed[node])
            else:
                weight = layer_weight(gm, node, rec)
                wq = LSQQuantizer(wbits, signed=True, channels=weight.shape[0] if self.per_channel else None)
                wq.init_from(weight, reduce=False)
            aq = LSQQuantizer(abits, signed=signed[node])
            wq.train(gm.training)
            aq.train(gm.training)
            x = layer_input(node)
            if x is None:
                raise PassError(f"layer {rec.name}: cannot find its input activation in {node.format_node()}")
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if module is not None and node.target not in swapped and type(module) in QUANT_LAYER_TYPES:
                swapped.add(node.target)
                new = to_quant_layer(module, wq)
                new.add_module("input_quantizer", aq)
                set_submodule(gm, node.target, new)
                w_path, a_path = f"{node.target}.weight_quantizer", f"{node.target}.input_quantizer"
                layer_node = node
            else:
                holder = nn.Module()
                holder.add_module("weight_quantizer", wq)
                holder.add_module("input_quantizer", aq)
                base = f"{CONTAINER}.{_mangle(rec.name)}"
                gm.get_submodule(CONTAINER).add_module(_mangle(rec.name), holder)
                w_path, a_path = f"{base}.weight_quantizer", f"{base}.input_quantizer"
                layer_node = self._route_weight(gm, node, rec, w_path)
            with gm.graph.inserting_before(layer_node):
                xq = gm.graph.call_module(a_path, (x,))
            layer_node.replace_input_with(x, xq)
            bn_path = None if rec.pinned else self._switch_bn(gm, layer_node)
            set_record(layer_node, dataclasses.replace(rec, sites=QuantSites(w_path, a_path, bn_path)))
        log.debug("inserted fake-quant on %d layers", len(layers))
        return PassResult(gm, True)

    @staticmethod
    def _route_weight(gm: fx.GraphModule, node: fx.Node, rec: LayerRecord, w_path: str) -> fx.Node:
        """Route the layer's weight through the quantizer at `w_path`; returns the (maybe new) call node."""
        g = gm.graph
        if node.op in ("call_function", "call_method"):  # functional layers, matmuls
            with g.inserting_before(node):
                wqn = g.call_module(w_path, (weight_arg(node),))
            set_weight_arg(node, wqn)
            return node
        # a second call of a shared module: call it functionally with its own weight quantizer
        if rec.conv is not None and rec.conv.padding_mode != "zeros":
            raise PassError(f"layer {rec.name}: a shared convolution with padding_mode={rec.conv.padding_mode!r} "
                            f"cannot be quantized per call; use one module per call")
        with g.inserting_before(node):
            w = g.get_attr(rec.weight)
            b = g.get_attr(rec.bias) if rec.bias is not None else None
            new = emit_call(g, rec, layer_input(node), g.call_module(w_path, (w,)), b)
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
                set_submodule(gm, user.target, SwitchableBatchNorm2d(m, self.bits))
                return user.target
            if type(m) is nn.BatchNorm1d:
                set_submodule(gm, user.target, SwitchableBatchNorm1d(m, self.bits))
                return user.target
        return None
