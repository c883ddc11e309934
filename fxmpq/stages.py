"""The one list of graph passes, in the method's order, and the public stages that run its slices.

capture (fxmpq.trace: records) -> AnnotateCost -> InsertFakeQuant -> [indicator training, search: not passes]
-> ApplyPolicy -> [fine-tuning] -> LowerToQDQ. `analyze`, `prepare` and `apply_policy` run the slices below;
`fxmpq.lower` runs `lower_passes()`. pipeline.py's quantize() calls these stages in order.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .capture.graph import NodeFailure, as_input_tuple, refuse_quantized, run_graph, trace
from .capture.record import records
from .core.batches import check_inputs
from .cost.analysis import Analysis
from .cost.policy import Policy
from .errors import ArgumentError, DataError, PolicyError
from .hardware.spec import HardwareSpec, Pins, load_hardware
from .passes import (
    AnnotateCostPass,
    ApplyPolicyPass,
    ContiguousBeforeReshapePass,
    FoldFloatConstantsPass,
    InsertFakeQuantPass,
    LowerToQDQPass,
    PassBase,
    run_passes,
)
from .quant.quant_model import QuantModel

log = logging.getLogger(__name__)

__all__ = ["analysis_passes", "analyze", "apply_passes", "apply_policy", "lower_passes", "prepare", "prepare_passes"]


# ----------------------------------------------------------------------------------------------- the passes
def analysis_passes(hardware: HardwareSpec, pins: Pins | None = None) -> list[PassBase]:
    """Price every recorded layer on `hardware` (pins from `pins` or the hardware file)."""
    return [AnnotateCostPass(hardware=hardware, pins=pins)]


def prepare_passes(hardware: HardwareSpec, bits: Sequence[int], *, pins: Pins | None = None,
                   per_channel: bool = False, act_bits: Sequence[int] | None = None) -> list[PassBase]:
    """Price the layers, then give each LSQ quantizers with a step size per candidate bit."""
    return [*analysis_passes(hardware, pins), InsertFakeQuantPass(bits=bits, per_channel=per_channel,
                                                                  act_bits=act_bits)]


def apply_passes(policy: Policy | Mapping[str, tuple[int, int]], *, output_bits: int = 8,
                 hardware: HardwareSpec | None = None) -> list[PassBase]:
    """Fix the quantizers at `policy` (formats `hardware` offers), add output quantizers and the int32-bias
    simulation."""
    return [ApplyPolicyPass(policy=policy, output_bits=output_bits, hardware=hardware)]


def lower_passes(example_inputs: Any = None, *, accuracy_level: int = 4) -> list[PassBase]:
    """Rewrite the fixed model into integer weights, int32 biases and QDQ ops, weight-only layers as MatMulNBits at
    `accuracy_level` (the hardware's matmul_nbits_accuracy_level), float constants computed once by PyTorch; the
    result is exactly the graph export translates."""
    return [LowerToQDQPass(example_inputs=example_inputs, accuracy_level=accuracy_level), FoldFloatConstantsPass(),
            ContiguousBeforeReshapePass()]


# ----------------------------------------------------------------------------------------------- the stages
def analyze(
    model: nn.Module | fx.GraphModule,
    example_inputs: Any,
    hardware: str | HardwareSpec = "bitops",
    *,
    pins: Pins | None = None,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
) -> Analysis:
    """Trace `model` and price each quantizable layer at every (w, a) pair of `hardware`.

    `pins` overrides the hardware file's pins (by default the first and last quantizable layers at 8/8).
    """
    refuse_quantized(model, "analyze")
    hw = load_hardware(hardware)
    gm = run_passes(trace(model, example_inputs, leaf_modules=leaf_modules), analysis_passes(hw, pins)).graph_module
    layers = tuple(r for _, r in records(gm))
    if not layers:
        log.warning("model %s has no quantizable layers (Conv1d/Conv2d/Linear)", type(model).__name__)
    log.info("analyzed %d layers on %s", len(layers), hw.name)
    return Analysis(layers=layers, hardware=hw, graph_module=gm)


def prepare(
    model: nn.Module,
    example_inputs: Any,
    hardware: str | HardwareSpec = "bitops",
    bits: Sequence[int] = (2, 3, 4, 5, 6),
    *,
    pins: Pins | None = None,
    per_channel: bool = False,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    act_bits: Sequence[int] | None = None,
) -> QuantModel:
    """Trace `model` (a copy; the user's model is never changed), price its layers and insert fake-quantizers.

    Every searchable layer gets weight and input-activation LSQ quantizers with one step size per bit in
    `bits` (which `hardware` must support for weights and activations); pinned layers get their pin bits.
    `act_bits` gives the activations candidates of their own (say (8, 16) with weight bits (4, 8) for an
    A16W8/A8W4 target); by default they are `bits`.
    The returned QuantModel starts with every quantizer off: call `set_uniform`/`set_policy` to quantize.
    """
    if isinstance(model, nn.Module):
        refuse_quantized(model, "prepare")
    hw = load_hardware(hardware)
    bits = _candidate_bits(bits)
    if not bits:
        raise PolicyError("prepare: bits must name at least one candidate bit-width")
    abits = bits if act_bits is None else _candidate_bits(act_bits)
    if not abits:
        raise PolicyError("prepare: act_bits must name at least one candidate bit-width")
    bad = [b for b in bits if b not in hw.weight_bits or (act_bits is None and b not in hw.act_bits)]
    bad_a = [b for b in abits if b not in hw.act_bits] if act_bits is not None else []
    if bad or bad_a:
        what = (f"candidate bits {list(bad)}" if bad else "") + (" and " if bad and bad_a else "") + \
               (f"activation candidate bits {list(bad_a)}" if bad_a else "")
        raise PolicyError(
            f"{what} are not supported by hardware {hw.name!r} ({hw.path})"
            f"{' for both weights and activations' if act_bits is None else ''}; it supports weight bits "
            f"{list(hw.weight_bits)} and activation bits {list(hw.act_bits)}")
    inputs = as_input_tuple(example_inputs)
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    gm = run_passes(gm, prepare_passes(hw, bits, pins=pins, per_channel=per_channel,
                                       act_bits=None if act_bits is None else abits)).graph_module
    shapes = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    qmodel = QuantModel(gm, hw, bits, example_shapes=shapes, act_bits=abits)
    qmodel.train(model.training)
    if not qmodel.layer_names:
        log.warning("model %s has no quantizable layers (Conv1d/Conv2d/Linear)", type(model).__name__)
    log.info("prepared %s: %d layers (%d searchable) at bits %s on %s", type(model).__name__,
             len(qmodel.layer_names), len(qmodel.searchable_names), bits, hw.name)
    return qmodel


def _candidate_bits(bits: Any) -> tuple[int, ...]:
    """`bits` (an iterable of integers) sorted without repeats; PolicyError for anything that is not bit-widths."""
    try:
        items = list(bits)
    except TypeError:
        raise ArgumentError(f"prepare: bits must be a sequence of bit-widths such as (2, 3, 4, 5, 6), found "
                          f"{type(bits).__name__}") from None
    bad = [b for b in items if isinstance(b, bool) or not isinstance(b, numbers.Integral)]
    if bad:
        raise ArgumentError(f"prepare: bits must be integers such as (2, 3, 4, 5, 6), found {bad[0]!r}")
    return tuple(sorted({int(b) for b in items}))


def apply_policy(qmodel: QuantModel, policy: Policy | Mapping[str, tuple[int, int]], example_inputs: Any = None,
                 *, output_bits: int = 8) -> QuantModel:
    """Fix `qmodel` (in place) at `policy` and add output quantizers; returns `qmodel`.

    With `example_inputs`, the model runs once on them (eval mode, no gradients) so that new output quantizers
    take their initial step size from data (LSQ's init); otherwise they do on the first batch.
    """
    if not isinstance(qmodel, QuantModel):
        raise ArgumentError(f"apply_policy: expected a QuantModel (from fxmpq.prepare), found {type(qmodel).__name__}")
    inputs = None
    if example_inputs is not None:
        inputs = check_inputs(as_input_tuple(example_inputs), qmodel.example_shapes, "apply_policy: example_inputs")
    run_passes(qmodel.graph_module, apply_passes(policy, output_bits=output_bits, hardware=qmodel.hardware))
    if inputs is not None:
        was = qmodel.training
        qmodel.eval()
        try:
            with torch.no_grad():
                run_graph(qmodel.graph_module, inputs)
        except NodeFailure as f:
            raise DataError(f"apply_policy: the model fails on example_inputs at {f.describe()}") from f.__cause__
        finally:
            qmodel.train(was)
    return qmodel
