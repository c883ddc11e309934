"""verify(): each candidate policy measured on held-out batches with the jointly trained model; the best chosen.

The joint training leaves one model that runs any policy (a step size and a BatchNorm per bit-width in every
layer), so switching it to a candidate (`QuantModel.set_policy`) and running a few validation batches in eval mode
estimates that policy's accuracy before any fine-tuning: the check of the search's proxy objective.
"""

from __future__ import annotations

import logging
import numbers
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.batches import check_reiterable, split_batch
from ..core.devices import as_device
from ..errors import ArgumentError, DataError, PolicyError, first_line
from ..quant.quant_model import QuantModel
from .candidates import Candidate, CandidateSet

log = logging.getLogger(__name__)

__all__ = ["Score", "evaluate", "held_out", "verify"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Score:
    """Top-1 accuracy and mean loss (per sample) of a model over some held-out samples."""

    accuracy: float
    loss: float
    samples: int


def held_out(data: Any, max_batches: int | None, what: str) -> Iterable[Any]:
    """What every evaluation of one verification iterates: the first `max_batches` batches of `data`, kept in a
    list (each candidate sees the same ones, even from a shuffling loader), or all of `data` (None), which must then
    iterate again (a DataLoader without shuffling yields the same batches each time). ArgumentError for a bad
    `max_batches`, DataError for a one-shot iterator."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral)
                                    or max_batches < 1):
        raise ArgumentError(f"{what}: max_batches must be None or an integer >= 1, found {max_batches!r}")
    check_reiterable(data, what)
    if max_batches is None:
        return data
    out = []
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        out.append(batch)
    return out


@torch.no_grad()
def evaluate(model: QuantModel | torch.nn.Module, batches: Iterable[Any], *, loss_fn: LossFn | None = None,
             device: torch.device | None = None, what: str = "val_data") -> Score:
    """Top-1 and mean `loss_fn` (default cross-entropy) of `model` in eval mode over `batches` of (inputs, class
    indices); the model's training mode is restored. DataError naming the batch when one does not fit."""
    loss_fn = loss_fn or F.cross_entropy
    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    try:
        for i, batch in enumerate(batches):
            inputs, y = split_batch(batch, i, what=what, class_targets=True)
            try:
                out = model(*(x.to(dev) for x in inputs))
            except Exception as e:
                raise DataError(f"{what}: the model fails on batch {i}: {type(e).__name__}: {first_line(e)}") from e
            y = y.to(out.device)
            correct += int((out.argmax(-1) == y).sum())
            loss_sum += float(loss_fn(out, y)) * int(y.numel())
            total += int(y.numel())
    finally:
        model.train(was)
    if total == 0:
        raise DataError(f"{what} yielded no samples")
    return Score(correct / total, loss_sum / total, total)


def verify(
    qmodel: QuantModel,
    candidates: CandidateSet,
    val_data: Any,
    *,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    loss_fn: LossFn | None = None,
    max_drop: float | None = None,
    reference_accuracy: float | None = None,
    progress: bool = True,
) -> CandidateSet:
    """`candidates` with each policy's estimated top-1 and loss on held-out batches, and the best one chosen.

    `qmodel` is the jointly trained model (fxmpq.train_indicators), before apply_policy: each candidate is switched
    in with `set_policy` and evaluated in eval mode (every bit-width's own BatchNorm statistics) on the first
    `max_batches` batches of `val_data` (None: all). Without a target the most accurate candidate is chosen (ties:
    the smaller loss, then the smaller objective). With `max_drop` (a fraction: 0.01 is one percentage point) and
    `reference_accuracy` (the FP32 model's top-1 on the same batches), the candidates are walked in their order (an
    accuracy target's set is ordered by cost) and the first whose estimated drop is within `max_drop` is chosen; the
    rest are left unevaluated. When none is, the last (the most expensive) is chosen and `target_met` says so. The model's
    quantizer switches and training mode are restored afterwards. `progress`: a bar over the candidates (stderr).

    Raises ArgumentError (not a QuantModel, an empty set, a bad max_batches, a target without its reference),
    PolicyError (a model whose policy is already applied, a candidate it cannot run), DataError (bad batches).
    """
    if not isinstance(qmodel, QuantModel):
        raise ArgumentError(f"verify: expected the jointly trained QuantModel (from fxmpq.prepare and "
                            f"fxmpq.train_indicators), found {type(qmodel).__name__}")
    if not isinstance(candidates, CandidateSet) or not len(candidates):
        raise ArgumentError(f"verify: expected a non-empty CandidateSet (fxmpq.candidates), found "
                            f"{type(candidates).__name__}" + (" with no candidates" if isinstance(candidates, CandidateSet)
                                                              else ""))
    if (max_drop is None) != (reference_accuracy is None):
        raise ArgumentError("verify: max_drop and reference_accuracy go together (the drop is measured from the "
                            "reference)")
    for name, v in (("max_drop", max_drop), ("reference_accuracy", reference_accuracy)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1):
            raise ArgumentError(f"verify: {name} must be a fraction in [0, 1] (0.01 is one percentage point), "
                                f"found {v!r}")
    applied = [r.name for r in qmodel.records if r.applied is not None]
    if applied:
        raise PolicyError(f"verify: the model's policy is already applied (layers {', '.join(applied[:3])}...); "
                          f"verify the jointly trained model before apply_policy")
    batches = held_out(val_data, max_batches, "verify: val_data")
    dev = as_device(device, "verify: device")
    before, was = qmodel.policy, qmodel.training
    scored: list[Candidate] = list(candidates)
    chosen = None
    samples = None
    bar = tqdm(total=len(candidates), desc="verify", unit="policy", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for i, cand in enumerate(candidates):
            bar.update(1)
            qmodel.set_policy(cand.policy)
            score = evaluate(qmodel, batches, loss_fn=loss_fn, device=dev, what="verify: val_data")
            samples = score.samples
            scored[i] = replace(cand, accuracy=score.accuracy, loss=score.loss)
            log.info("verify: candidate %d (%s): top-1 %.4f, loss %.4f", i, "; ".join(cand.sources), score.accuracy,
                     score.loss)
            bar.set_postfix_str(f"top-1 {100 * score.accuracy:.2f} % ({'; '.join(cand.sources)})", refresh=False)
            if max_drop is not None and reference_accuracy - score.accuracy <= max_drop + 1e-12:
                chosen = i  # the cheapest within the target: the walk stops here
                break
    finally:
        bar.close()
        if before is None:
            qmodel.disable_quant()
        else:
            qmodel.set_policy(before)
        qmodel.train(was)
    if chosen is None:
        # no candidate certified: under a target, the most expensive (the jointly trained model underestimates what
        # fine-tuning recovers, and more bits recover more; its ranking among near-equal estimates is noise)
        chosen = _most_accurate(scored) if max_drop is None else len(scored) - 1
    return replace(candidates, candidates=tuple(scored), chosen=chosen, samples=samples, max_drop=max_drop,
                   reference_accuracy=reference_accuracy)


def _most_accurate(cands: Sequence[Candidate]) -> int:
    """The index of the evaluated candidate with the highest top-1 (ties: smaller loss, then smaller objective)."""
    evaluated = [i for i, c in enumerate(cands) if c.accuracy is not None]
    return min(evaluated, key=lambda i: (-cands[i].accuracy, cands[i].loss, cands[i].objective, i))
