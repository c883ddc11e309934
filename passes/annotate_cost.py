"""AnnotateCostPass: writes each layer's pins and its cost in every format the hardware offers into its record."""

from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmpq.capture.record import records, set_record
from fxmpq.errors import PolicyError
from fxmpq.hardware.spec import HardwareSpec, Pins

log = logging.getLogger(__name__)

__all__ = ["AnnotateCostPass"]


class AnnotateCostPass(PassBase):
    """An analysis pass: it replaces records only and returns modified=False (like torch.fx's ShapeProp).

    Needs the records capture writes (fxmpq.trace). Pins come from `pins` when given, else from the hardware
    description; a pinned layer runs at the pins' bits. A hardware file with measured per-layer tables must
    describe exactly this model's layers (names and shapes): HardwareSpecError naming the file otherwise.
    """

    def __init__(self, *, hardware: HardwareSpec, pins: Pins | None = None):
        super().__init__()
        self.hardware = hardware
        self.pins = pins if pins is not None else hardware.pins

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        found = list(records(graph_module))
        names = [r.name for _, r in found]
        unknown = [n for n in self.pins.layers if n not in names]
        if unknown:
            raise PolicyError(
                f"pinned layer(s) {', '.join(map(repr, unknown))} (hardware {self.hardware.name!r}, pins.layers) "
                f"are not quantizable layers of this model; its layers are: {_short_list(names)}"
            )
        pinned = set(self.pins.layers)
        if found and self.pins.first_layer:
            pinned.add(names[0])
        if found and self.pins.last_layer:
            pinned.add(names[-1])
        if pinned and not self.hardware.supports(*self.pins.bits):
            w, a = self.pins.bits
            raise PolicyError(f"pinned bits W{w}A{a} are not a pair hardware {self.hardware.name!r} runs "
                              f"({self.hardware.path}); supported pairs: {self.hardware.pairs}")
        self.hardware.check_layers(r for _, r in found)  # per-layer tables: this model's layers and shapes
        kind_of = {r.name: r.kind for _, r in found}
        for node, rec in found:
            formats = self.hardware.formats(rec.kind)
            costs = {pair: MappingProxyType(self.hardware.layer_cost(rec, *pair)) for pair in formats}
            chain = {}
            if rec.input_layer in kind_of and self.hardware.chained:
                chain = {(f, g): MappingProxyType(self.hardware.chain_cost(rec, f, g)) for f in formats
                         for g in self.hardware.formats(kind_of[rec.input_layer])}
            is_pinned = rec.name in pinned
            set_record(node, dataclasses.replace(rec, pinned=is_pinned, pin_bits=self.pins.bits if is_pinned else None,
                                                 costs=MappingProxyType(costs), chain_costs=MappingProxyType(chain)))
        log.debug("annotated %d layers (%d pinned)", len(found), len(pinned))
        return PassResult(graph_module, False)


def _short_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
