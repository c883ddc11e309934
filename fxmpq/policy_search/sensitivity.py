"""Measured sensitivities as indicators: the held-out loss increase when one layer alone drops to b bits."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import Any

import torch

from ..core.devices import as_device
from ..errors import ArgumentError, PolicyError
from ..quant.quant_model import QuantModel
from .indicators import Indicators
from .verify import evaluate, held_out

log = logging.getLogger(__name__)

__all__ = ["measured_indicators"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_FLOOR = 1e-6  # the smallest indicator, relative to the largest loss increase (indicators must be positive)


def measured_indicators(
    qmodel: QuantModel,
    data: Any,
    *,
    batches: int = 4,
    loss_fn: LossFn | None = None,
    device: str | torch.device | None = None,
) -> Indicators:
    """Per searchable layer and candidate bit: the loss increase on held-out batches when that layer alone runs at
    that bit-width, on the jointly trained model; weights and input activations measured separately.

    The reference is the model with every searchable layer at the highest candidate weight and activation bits
    (pinned layers at their pins), in eval mode, on the first `batches` batches of `data` (kept, so every
    measurement sees the same samples). For layer l and weight bit b, l's weight quantizer and its BatchNorm switch
    to b (the activation stays at the highest bit) and the mean `loss_fn` (default cross-entropy) is measured again;
    likewise for l's input quantizer at each activation bit. Each row is then made non-increasing in the bits (the
    largest increase at this or any higher bit, so noise never makes a lower bit look safer) and floored at 1e-6 of
    the largest increase (an indicator is positive; the highest bit's increase is 0 by definition).

    The search uses them unchanged (`fxmpq.search`, `fxmpq.candidates`): weight and activation terms are in the
    same unit (loss), so use alpha=1. Their `meta` records the source, the batches and the reference loss. The
    model's quantizer switches and training mode are restored. Raises ArgumentError (not a QuantModel, a bad
    `batches`), PolicyError (a model whose policy is already applied), DataError (bad batches).
    """
    if not isinstance(qmodel, QuantModel):
        raise ArgumentError(f"measured_indicators: expected the jointly trained QuantModel (fxmpq.prepare, "
                            f"fxmpq.train_indicators), found {type(qmodel).__name__}")
    if isinstance(batches, bool) or not isinstance(batches, numbers.Integral) or batches < 1:
        raise ArgumentError(f"measured_indicators: batches must be an integer >= 1, found {batches!r}")
    applied = [r.name for r in qmodel.records if r.applied is not None]
    if applied:
        raise PolicyError(f"measured_indicators: the model's policy is already applied (layers "
                          f"{', '.join(applied[:3])}...); measure the jointly trained model before apply_policy")
    held = held_out(data, int(batches), "measured_indicators: data")
    dev = as_device(device, "measured_indicators: device")
    names = qmodel.searchable_names
    w_top, a_top = max(qmodel.bits), max(qmodel.act_bits)
    before, was = qmodel.policy, qmodel.training

    def loss() -> float:
        return evaluate(qmodel, held, loss_fn=loss_fn, device=dev, what="measured_indicators: data").loss

    rise: dict[tuple[str, str], dict[int, float]] = {}
    try:
        qmodel.set_uniform(w_top, a_top)
        base = evaluate(qmodel, held, loss_fn=loss_fn, device=dev, what="measured_indicators: data")
        for n in names:
            wq, aq, bn = qmodel.weight_quantizer(n), qmodel.act_quantizer(n), qmodel.batchnorm(n)
            rise[(n, "w")] = {w_top: 0.0}
            for b in wq.bits:
                if b != w_top:
                    wq.set_bits(b)
                    if bn is not None:
                        bn.set_bits(b)
                    rise[(n, "w")][b] = loss() - base.loss
            wq.set_bits(w_top)
            if bn is not None:
                bn.set_bits(w_top)
            rise[(n, "a")] = {a_top: 0.0}
            for b in aq.bits:
                if b != a_top:
                    aq.set_bits(b)
                    rise[(n, "a")][b] = loss() - base.loss
            aq.set_bits(a_top)
    finally:
        if before is None:
            qmodel.disable_quant()
        else:
            qmodel.set_policy(before)
        qmodel.train(was)
    top = max((v for row in rise.values() for v in row.values()), default=0.0)
    floor = _FLOOR * top if top > 0 else 1e-12
    table: dict[str, dict[str, dict[int, float]]] = {"w": {}, "a": {}}
    for (n, kind), row in rise.items():
        out, running = {}, 0.0
        for b in sorted(row, reverse=True):  # highest bit first: the largest increase at b or any higher bit
            running = max(running, row[b])
            out[b] = max(running, floor)
        table[kind][n] = out
    meta = {"source": "fxmpq.measured_indicators", "hardware": qmodel.analysis.hardware.name,
            "method": f"loss increase with one layer at b bits, the rest at W{w_top}A{a_top}, on {base.samples} "
                      f"held-out samples ({batches} batches); rows non-increasing in the bits, floored at "
                      f"{floor:.3g}",
            "reference_loss": f"{base.loss:.6g}"}
    log.info("measured_indicators: reference loss %.4f on %d samples; largest increase %.4f", base.loss,
             base.samples, top)
    return Indicators(layers=tuple(names), bits=qmodel.all_bits, weight=table["w"], act=table["a"], meta=meta)
