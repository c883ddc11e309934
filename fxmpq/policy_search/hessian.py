"""A second indicator source to compare with: HAWQ-style Hessian sensitivities (trace x perturbation)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.batches import split_batch
from ..core.devices import as_device
from ..core.primitives import fake_quantize
from ..errors import ArgumentError, DataError, PolicyError, first_line
from ..quant.lsq import LSQQuantizer
from ..quant.quant_model import QuantModel
from .indicators import Indicators

log = logging.getLogger(__name__)

__all__ = ["hessian_indicators", "mse_step", "quantization_error"]

_GRID = 64  # candidate step sizes per bit-width for the MSE-optimal step
_SAMPLE = 1 << 18  # elements used to choose an activation step (the error itself uses all of them)


@torch.no_grad()
def quantization_error(v: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """||Q(v) - v||^2 with Q(v) = clamp(round(v / step), qmin, qmax) * step (step broadcastable to v)."""
    q = fake_quantize(v, step, qmin, qmax)
    return (q - v).pow(2).sum()


@torch.no_grad()
def mse_step(v: torch.Tensor, qmin: int, qmax: int, *, channels: bool = False) -> torch.Tensor:
    """The step size minimising ||Q(v) - v||^2 on a grid of fractions of the range (per channel along dim 0).

    Returns a scalar tensor, or [C, 1, ...] (broadcastable to v) with `channels`.
    """
    rows = v.reshape(v.shape[0], -1) if channels else v.reshape(1, -1)
    if not channels and rows.shape[1] > _SAMPLE:
        idx = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:_SAMPLE]
        rows = rows[:, idx.to(rows.device)]
    reach = max(-qmin, qmax)
    top = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / reach
    best_err = torch.full((rows.shape[0], 1), math.inf, device=v.device, dtype=v.dtype)
    best = top.clone()
    for frac in torch.linspace(1.0 / _GRID, 1.0, _GRID).tolist():
        s = top * frac
        err = (fake_quantize(rows, s, qmin, qmax) - rows).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best.reshape(-1, *([1] * (v.dim() - 1))) if channels else best.reshape(())


class _Tap:
    """Forward hook on a quantizer (switched off): hands out a fresh autograd node for the tensor it passes."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        out = output.view_as(output)
        self.tensor = out
        return out


def hessian_indicators(
    qmodel: QuantModel,
    data: Iterable[Any],
    *,
    batches: int = 4,
    probes: int = 4,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> Indicators:
    """HAWQ-style sensitivities of every searchable layer's weight and input activation at each candidate bit.

    HAWQ-V2 (Dong et al., NeurIPS 2020) and HAWQ-V3 (Yao et al., ICML 2021) rank layers by the average Hessian
    trace of the loss with respect to a layer's tensor times the squared quantization perturbation of that tensor,
    `Omega_l(b) = Tr(H_l) / n_l * ||Q_b(T_l) - T_l||^2`, the second-order estimate of the loss increase when layer
    l is quantized to b bits. It is returned as `Indicators`, so `fxmpq.search` picks a policy from it with the
    same ILP and budget (use `alpha=1.0`: weight and activation terms are in the same unit, loss increase).

    The model runs in full precision and eval mode (quantizers off, BatchNorm on running statistics). For
    `batches` batches of `data` ((inputs, targets) pairs) and `probes` Rademacher vectors each, Hutchinson's
    estimator `v^T H v` gives the Hessian trace of the loss with respect to each layer's weight and to the
    activation that layer reads. The perturbation at b bits uses the MSE-optimal step size on the layer's own
    b-bit grid (signed/unsigned and per-channel as the model's quantizers). A trace estimate that comes out
    negative (a non-convex point) is floored at 1e-6 of the largest one, so every indicator stays positive.
    The model's quantizer switches and training mode are restored afterwards.
    """
    if not isinstance(qmodel, QuantModel):
        raise ArgumentError(f"hessian_indicators: expected a QuantModel (from fxmpq.prepare), found {type(qmodel).__name__}")
    if batches < 1 or probes < 1:
        raise ArgumentError(f"hessian_indicators: batches and probes must be >= 1, found {batches}, {probes}")
    names = qmodel.searchable_names
    loss_fn = loss_fn or F.cross_entropy
    dev = as_device(device, "hessian_indicators: device") or next(qmodel.parameters()).device
    before, was_training = qmodel.policy, qmodel.training
    qmodel.to(dev)
    qmodel.disable_quant()
    qmodel.eval()
    taps = {(n, kind): _Tap() for n in names for kind in ("w", "a")}
    handles = [(qmodel.weight_quantizer(n) if kind == "w" else qmodel.act_quantizer(n)).register_forward_hook(tap)
               for (n, kind), tap in taps.items()]
    quantizers: dict[tuple[str, str], LSQQuantizer] = {
        (n, kind): qmodel.weight_quantizer(n) if kind == "w" else qmodel.act_quantizer(n) for (n, kind) in taps}
    trace_sum = dict.fromkeys(taps, 0.0)  # sum over batches of (trace / numel)
    act_err = {(n, "a"): dict.fromkeys(qmodel.act_quantizer(n).bits, 0.0) for n in names}
    weights: dict[str, torch.Tensor] = {}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seen = 0
    try:
        for i, batch in enumerate(data):
            if seen >= batches:
                break
            x, y = split_batch(batch, i, qmodel.example_shapes, what="hessian_indicators",
                               classes=qmodel.classes if loss_fn is F.cross_entropy else None)
            # the model's input may be a searchable layer's activation (an unpinned first layer): its Hessian
            # needs the gradient with respect to the input itself
            inputs = tuple(t.to(dev).detach().requires_grad_() if t.is_floating_point() else t.to(dev) for t in x)
            try:
                out = qmodel(*inputs)
            except Exception as e:
                raise DataError(f"hessian_indicators: the model fails on batch {i}: {type(e).__name__}: "
                                f"{first_line(e)}") from e
            loss = loss_fn(out, y.to(dev))
            keys = list(taps)
            tensors = [taps[k].tensor for k in keys]
            if any(t is None for t in tensors):
                missing = [f"{n}/{kind}" for (n, kind), t in zip(keys, tensors) if t is None]
                raise PolicyError(f"hessian_indicators: quantizers of {', '.join(missing)} did not run")
            grads = torch.autograd.grad(loss, tensors, create_graph=True)
            for _ in range(probes):
                vs = [torch.randint(0, 2, t.shape, generator=gen).to(dev, t.dtype).mul_(2).sub_(1) for t in tensors]
                dot = sum((g * v).sum() for g, v in zip(grads, vs))
                hvs = torch.autograd.grad(dot, tensors, retain_graph=True)
                for k, hv, v, t in zip(keys, hvs, vs, tensors):
                    trace_sum[k] += float((hv * v).sum()) / t.numel() / probes
            for (n, kind), t in zip(keys, tensors):
                if kind == "w":
                    weights[n] = t.detach()  # the FP32 weight as the layer receives it (functional layers too)
                else:
                    aq = quantizers[(n, kind)]
                    a = t.detach()
                    for b in aq.bits:
                        qmin, qmax = aq.qrange(b)
                        act_err[(n, kind)][b] += float(quantization_error(a, mse_step(a, qmin, qmax), qmin, qmax))
            for tap in taps.values():
                tap.tensor = None
            seen += 1
    finally:
        for h in handles:
            h.remove()
        if before is None:
            qmodel.disable_quant()
        else:
            qmodel.set_policy(before)
        qmodel.train(was_training)
    if seen == 0:
        raise DataError("hessian_indicators: the data yielded no batch")
    traces = {k: v / seen for k, v in trace_sum.items()}
    floor = 1e-6 * max(max(traces.values()), 1e-30)
    negative = [f"{n}/{kind}" for (n, kind), t in traces.items() if t <= 0]
    if negative:
        log.info("hessian_indicators: non-positive trace estimates floored for %s", ", ".join(negative))
    weight: dict[str, dict[int, float]] = {}
    act: dict[str, dict[int, float]] = {}
    for n in names:
        wq = quantizers[(n, "w")]
        w = weights[n]
        weight[n] = {}
        for b in wq.bits:
            qmin, qmax = wq.qrange(b)
            err = float(quantization_error(w, mse_step(w, qmin, qmax, channels=bool(wq.channels)), qmin, qmax))
            weight[n][b] = max(traces[(n, "w")], floor) * max(err, 1e-30)
        act[n] = {b: max(traces[(n, "a")], floor) * max(e / seen, 1e-30) for b, e in act_err[(n, "a")].items()}
    meta = {"source": "fxmpq.hessian_indicators", "hardware": qmodel.analysis.hardware.name,
            "method": f"Hutchinson trace ({seen} batches x {probes} probes) x MSE-optimal quantization error"}
    return Indicators(layers=tuple(names), bits=qmodel.all_bits, weight=weight, act=act, meta=meta)

