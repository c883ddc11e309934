"""AnnotateCostPass: writes each quantizable layer's shape, MACs, params, pins and costs into node.meta."""

from __future__ import annotations

import logging

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmpq.errors import PolicyError
from fxmpq.graph import (
    LayerMeta,
    find_quantizable_nodes,
    input_node,
    layer_macs,
    layer_params,
    node_shapes,
    set_layer_meta,
)
from fxmpq.hardware import HardwareSpec, Pins

log = logging.getLogger(__name__)


class AnnotateCostPass(PassBase):
    """An analysis pass: it writes metadata only and returns modified=False (like torch.fx's ShapeProp).

    Needs shapes in node.meta (fxmpq.trace propagates them). Pins come from `pins` when given, else from the
    hardware description.
    """

    def __init__(self, *, hardware: HardwareSpec, pins: Pins | None = None):
        super().__init__()
        self.hardware = hardware
        self.pins = pins if pins is not None else hardware.pins

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        found = find_quantizable_nodes(graph_module)
        names = [q.name for q in found]
        unknown = [n for n in self.pins.layers if n not in names]
        if unknown:
            raise PolicyError(
                f"pinned layer(s) {', '.join(map(repr, unknown))} (hardware {self.hardware.name!r}, pins.layers) "
                f"are not quantizable layers of this model; its layers are: {_short_list(names)}"
            )
        pinned = set(self.pins.layers)
        if found and self.pins.first_layer:
            pinned.add(found[0].name)
        if found and self.pins.last_layer:
            pinned.add(found[-1].name)
        if pinned and not self.hardware.supports(*self.pins.bits):
            w, a = self.pins.bits
            raise PolicyError(f"pinned bits W{w}A{a} are not a pair hardware {self.hardware.name!r} runs "
                              f"({self.hardware.path}); supported pairs: {self.hardware.pairs}")
        for q in found:
            in_shape, out_shape = node_shapes(q)
            macs, params = layer_macs(q), layer_params(q)
            costs = {
                pair: self.hardware.layer_cost(q.kind, macs, params, *pair) for pair in self.hardware.pairs
            }
            x = input_node(q)
            is_pinned = q.name in pinned
            set_layer_meta(q.node, LayerMeta(
                name=q.name, kind=q.kind, macs=macs, params=params, in_shape=in_shape, out_shape=out_shape,
                groups=q.groups, pinned=is_pinned, pin_bits=self.pins.bits if is_pinned else None,
                input_node=x.name if x is not None else "", costs=costs,
            ))
        log.debug("annotated %d layers (%d pinned)", len(found), len(pinned))
        return PassResult(graph_module, False)


def _short_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
