"""prepare(): trace a model, price its layers and insert LSQ fake-quantizers, giving a QuantModel."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .analysis import Analysis
from .errors import PolicyError
from .graph import as_input_tuple, quantizable_layers, trace
from .hardware import HardwareSpec, Pins, load_hardware
from .quant import QuantModel

log = logging.getLogger(__name__)

__all__ = ["prepare"]


def prepare(
    model: nn.Module,
    example_inputs: Any,
    hardware: str | HardwareSpec = "bitops",
    bits: Sequence[int] = (2, 3, 4, 5, 6),
    *,
    pins: Pins | None = None,
    per_channel: bool = False,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
) -> QuantModel:
    """Trace `model` (a copy; the user's model is never changed), annotate costs and insert fake-quantizers.

    Every searchable layer gets weight and input-activation LSQ quantizers with one step size per bit in
    `bits` (which `hardware` must support for weights and activations); pinned layers get their pin bits.
    The returned QuantModel starts with every quantizer off: call `set_uniform`/`set_policy` to quantize.
    """
    from fxmpq.passes import AnnotateCostPass, InsertFakeQuantPass, run_passes

    hw = load_hardware(hardware)
    bits = tuple(sorted({int(b) for b in bits}))
    if not bits:
        raise PolicyError("prepare: bits must name at least one candidate bit-width")
    bad = [b for b in bits if b not in hw.weight_bits or b not in hw.act_bits]
    if bad:
        raise PolicyError(
            f"candidate bits {list(bad)} are not supported by hardware {hw.name!r} ({hw.path}) for both weights "
            f"and activations; it supports weight bits {list(hw.weight_bits)} and activation bits "
            f"{list(hw.act_bits)}")
    inputs = as_input_tuple(example_inputs)
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    insert = InsertFakeQuantPass(bits=bits, per_channel=per_channel)
    result = run_passes(gm, [AnnotateCostPass(hardware=hw, pins=pins), insert])
    gm = result.graph_module
    layers = tuple(m for _, m in quantizable_layers(gm))
    if not layers:
        log.warning("model %s has no quantizable layers (Conv1d/Conv2d/Linear)", type(model).__name__)
    analysis = Analysis(layers=layers, hardware=hw, graph_module=gm)
    shapes = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    qmodel = QuantModel(gm, analysis, bits, insert.sites, example_shapes=shapes)
    qmodel.train(model.training)
    log.info("prepared %s: %d layers (%d searchable) at bits %s on %s", type(model).__name__, len(layers),
             len(analysis.searchable), bits, hw.name)
    return qmodel
