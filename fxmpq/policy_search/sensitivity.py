"""Measured sensitivities as indicators: the held-out loss increase when one layer alone drops to b bits.

Each increase comes with its standard error (paired over the held-out samples). Where an increase is not told
apart from zero, the measurement says nothing, so the row continues from its last resolved bit by the quantization
noise model (the error power falls 4x per bit), instead of a floor that makes every unresolved bit look free.
"""

from __future__ import annotations

import logging
import numbers
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.batches import split_batch
from ..core.devices import as_device
from ..errors import ArgumentError, DataError, PolicyError, first_line
from ..quant.quant_model import QuantModel
from .indicators import Indicators
from .verify import held_out

log = logging.getLogger(__name__)

__all__ = ["measured_indicators"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_FLOOR = 1e-6  # the smallest indicator, relative to the largest loss increase (indicators must be positive)
_Z = 2.0  # an increase is resolved when it exceeds _Z standard errors
_DECAY = 4.0  # quantization error power per bit (a step half as large): the row's slope where nothing is resolved
_TIE = 1.01  # resolved rows strictly decreasing: a lower bit at least 1 % worse than the next higher one


@torch.no_grad()
def _sample_values(qmodel: torch.nn.Module, held: Any, loss_fn: LossFn | None, dev: torch.device,
                   reference: list[torch.Tensor] | None, keep_logp: bool = False
                   ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """`qmodel`'s per-unit values over `held` (eval mode, float64), its log-probabilities per batch when
    `keep_logp`, and the number of samples.

    Without `reference`: the loss per sample (cross-entropy) or, with a custom `loss_fn` (one number per batch),
    per batch. With `reference` (the reference model's log-probabilities per batch): the KL divergence of this
    model's output distribution from the reference's, per sample. These are the units the paired standard errors
    are taken over."""
    values, logps, samples = [], [], 0
    for i, batch in enumerate(held):
        inputs, y = split_batch(batch, i, what="measured_indicators: data", class_targets=True)
        try:
            out = qmodel(*(x.to(dev) for x in inputs))
        except Exception as e:
            raise DataError(f"measured_indicators: data: the model fails on batch {i}: {type(e).__name__}: "
                            f"{first_line(e)}") from e
        y = y.to(out.device)
        samples += int(y.numel())
        logp = F.log_softmax(out.double(), dim=-1).cpu() if keep_logp or reference is not None else None
        if keep_logp:
            logps.append(logp)
        if reference is not None:
            ref = reference[i]
            values.append((ref.exp() * (ref - logp)).sum(-1).reshape(-1))
        elif loss_fn is None:
            values.append(F.cross_entropy(out, y, reduction="none").double().reshape(-1).cpu())
        else:
            values.append(torch.tensor([float(loss_fn(out, y))], dtype=torch.float64))
    if not values or sum(t.numel() for t in values) == 0:
        raise DataError("measured_indicators: data yielded no samples")
    return torch.cat(values), logps, samples


def repair_row(rise: dict[int, tuple[float, float]], floor: float) -> dict[int, float]:
    """One layer's indicators from its measured (increase, standard error) per bit: non-increasing in the bits
    (the largest increase at this or any higher bit, so noise never makes a lower bit look safer), strictly so
    (`_TIE`), and above the highest bit whose increase exceeds `_Z` standard errors it falls `_DECAY`-fold per bit
    (quantization error power); a row with no resolved bit starts at its lowest bit's noise level `_Z * se`."""
    bits = sorted(rise)
    resolved = [b for b in bits if rise[b][0] > _Z * rise[b][1]]
    out: dict[int, float] = {}
    if resolved:
        top_r = max(resolved)
        running = 0.0
        for b in sorted((b for b in bits if b <= top_r), reverse=True):
            running = max(running * _TIE, rise[b][0])
            out[b] = running
        anchor, start = out[top_r], top_r
    else:
        anchor, start = max(_Z * rise[bits[0]][1], floor), bits[0]
        out[start] = anchor
    for b in bits:
        if b > start:
            out[b] = anchor * _DECAY ** -(b - start)
    return {b: max(out[b], floor) for b in bits}


def measured_indicators(
    qmodel: QuantModel,
    data: Any,
    *,
    batches: int = 4,
    loss_fn: LossFn | None = None,
    device: str | torch.device | None = None,
    metric: str = "loss",
    progress: bool = False,
) -> Indicators:
    """Per searchable layer and candidate bit: the loss increase on held-out batches when that layer alone runs at
    that bit-width, on the jointly trained model; weights and input activations measured separately.

    The reference is the model with every searchable layer at the highest candidate weight and activation bits
    (pinned layers at their pins), in eval mode, on the first `batches` batches of `data` (kept, so every
    measurement sees the same samples). For layer l and weight bit b, l's weight quantizer and its BatchNorm switch
    to b (the activation stays at the highest bit) and the mean `loss_fn` (default cross-entropy) is measured again;
    likewise for l's input quantizer at each activation bit. Each increase has a paired standard error over the
    samples (default loss; over the batches with a custom `loss_fn`, which returns one number per batch). Each row
    is then made non-increasing in the bits (the largest increase at this or any higher bit, so noise never makes a
    lower bit look safer, and 1 % more per bit down, so a tie never makes a lower bit free); above the row's highest
    bit whose increase exceeds 2 standard errors the measurement cannot tell the bits apart, so the row falls 4x per
    bit from there (quantization error power halves its step per bit); a row with nothing resolved starts from
    its lowest bit's noise level (2 standard errors). Floored at 1e-6 of the largest increase (an indicator is
    positive). Measured on the benchmark nets, the floor alone left whole rows equal, and the search then gave such
    layers 2-bit activations for free (docs/search.md).

    `progress`: a bar over the layers (stderr); each layer costs (weight bits + activation bits - 2) passes over
    the batches. The search uses them unchanged (`fxmpq.search`, `fxmpq.candidates`): weight and activation terms are in the
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
    if metric not in ("loss", "kl"):
        raise ArgumentError(f"measured_indicators: metric={metric!r}: expected 'loss' (the loss increase) or 'kl' "
                            f"(the output distribution's KL divergence from the reference's)")
    held = held_out(data, int(batches), "measured_indicators: data")
    dev = as_device(device, "measured_indicators: device") or next(
        (p.device for p in qmodel.parameters()), torch.device("cpu"))
    names = qmodel.searchable_names
    w_top, a_top = max(qmodel.bits), max(qmodel.act_bits)
    before, was = qmodel.policy, qmodel.training

    base_losses = torch.zeros(0, dtype=torch.float64)
    base_logp: list[torch.Tensor] = []
    samples = 0

    def rise_now() -> tuple[float, float]:
        """(mean increase over the reference, its paired standard error) with the quantizers as they are now."""
        if metric == "kl":
            d = _sample_values(qmodel, held, None, dev, base_logp)[0]
        else:
            d = _sample_values(qmodel, held, loss_fn, dev, None)[0] - base_losses
        se = float(d.std(unbiased=True)) / d.numel() ** 0.5 if d.numel() > 1 else 0.0
        return float(d.mean()), se

    rise: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    try:
        qmodel.eval()
        qmodel.set_uniform(w_top, a_top)
        base_losses, base_logp, samples = _sample_values(qmodel, held, loss_fn, dev, None, keep_logp=metric == "kl")
        for n in tqdm(names, desc="measured sensitivities", unit="layer", disable=not progress, file=sys.stderr,
                      leave=False):
            wq, aq, bn = qmodel.weight_quantizer(n), qmodel.act_quantizer(n), qmodel.batchnorm(n)
            rise[(n, "w")] = {w_top: (0.0, 0.0)}
            for b in wq.bits:
                if b != w_top:
                    wq.set_bits(b)
                    if bn is not None:
                        bn.set_bits(b)
                    rise[(n, "w")][b] = rise_now()
            wq.set_bits(w_top)
            if bn is not None:
                bn.set_bits(w_top)
            rise[(n, "a")] = {a_top: (0.0, 0.0)}
            for b in aq.bits:
                if b != a_top:
                    aq.set_bits(b)
                    rise[(n, "a")][b] = rise_now()
            aq.set_bits(a_top)
    finally:
        if before is None:
            qmodel.disable_quant()
        else:
            qmodel.set_policy(before)
        qmodel.train(was)
    top = max((m for row in rise.values() for m, _ in row.values()), default=0.0)
    floor = _FLOOR * top if top > 0 else 1e-12
    table: dict[str, dict[str, dict[int, float]]] = {"w": {}, "a": {}}
    for (n, kind), row in rise.items():
        table[kind][n] = repair_row(row, floor)
    unresolved = sum(1 for row in rise.values() for b, (m, se) in row.items() if m <= _Z * se and b != max(row))
    total = sum(len(row) - 1 for row in rise.values())
    ref_loss = float(base_losses.mean())
    meta = {"source": "fxmpq.measured_indicators", "metric": metric, "hardware": qmodel.analysis.hardware.name,
            "method": f"{'loss increase' if metric == 'loss' else 'KL divergence of the outputs'} with one layer "
                      f"at b bits, the rest at W{w_top}A{a_top}, on {samples} held-out samples ({batches} "
                      f"batches); rows non-increasing in the bits; above a row's highest increase beyond "
                      f"{_Z:g} standard errors, {_DECAY:g}x smaller per bit ({unresolved} of {total} increases "
                      f"unresolved); floored at {floor:.3g}",
            "reference_loss": f"{ref_loss:.6g}"}
    log.info("measured_indicators: reference loss %.4f on %d samples; largest increase %.4f; %d of %d increases "
             "within %g standard errors of zero", ref_loss, samples, top, unresolved, total, _Z)
    return Indicators(layers=tuple(names), bits=qmodel.all_bits, weight=table["w"], act=table["a"], meta=meta)
