"""train_indicators() and finetune(): the method's two trainings, each a step function on the shared loop.

Joint training runs every candidate bit-width uniformly, then one random per-layer policy, each step; the learned
step sizes are the indicators. Fine-tuning runs the fixed policy once per step, optionally distilled from a teacher.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.options import TrainOptions, check_joint_passes, fold_keywords
from ..errors import PolicyError
from ..policy_search.indicators import Indicators
from ..quant.quant_model import QuantModel
from .ddp import pick_device
from .loop import (
    LossFn,
    OptimizerFactory,
    StepFn,
    TrainStats,
    _expect_quant_model,
    _StepContext,
    indicators_from_model,
    random_policy,
    run_training,
)
from .train_state import Stage

log = logging.getLogger(__name__)

__all__ = ["finetune", "train_indicators"]


def _kl(student: torch.Tensor, teacher_prob: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the last dimension, averaged over the batch (in-place distillation)."""
    return F.kl_div(F.log_softmax(student, dim=-1), teacher_prob, reduction="batchmean")




# ------------------------------------------------------------------------------------------- the two trainings
def joint_pairs(pairs: list[tuple[int, int]], mode: str, rng: random.Random) -> list[tuple[int, int]]:
    """The uniform (w, a) passes of one joint step, highest first: every pair ("all"), or the highest, one of
    those between at random and the lowest ("sandwich", the rule of slimmable networks; all of them when there
    are at most three)."""
    if mode == "all" or len(pairs) <= 3:
        return list(pairs)
    return [pairs[0], rng.choice(pairs[1:-1]), pairs[-1]]


def _joint_step(distill: bool, mode: str = "all") -> StepFn:
    def step(ctx: _StepContext, inputs: tuple[torch.Tensor, ...], targets: Any) -> dict[str, float]:
        qm = ctx.qmodel
        rng = random.Random(ctx.seed * 1_000_003 + ctx.step)
        # None: the random policy. "all" draws nothing here, so its policies are those of before the option
        passes: list[tuple[int, int] | None] = [*joint_pairs(qm.uniform_pairs, mode, rng), None]
        teacher = None
        losses: dict[str, float] = {}
        for i, b in enumerate(passes):
            if b is None:
                qm.set_policy(random_policy(qm, rng))
            else:
                qm.set_uniform(*b)
            with ctx.sync(last=i == len(passes) - 1):
                out = ctx.forward(inputs)
                if teacher is None or not distill:
                    loss = ctx.loss_fn(out, targets)
                else:
                    loss = _kl(out, teacher)
                if distill and teacher is None:
                    teacher = out.detach().softmax(dim=-1)
                loss.backward()
            losses[(f"w{b[0]}" if b[0] == b[1] else f"w{b[0]}a{b[1]}") if b is not None else "rand"] = float(loss.detach())
        return losses

    return step


def _plain_step(teacher: nn.Module | None) -> StepFn:
    def step(ctx: _StepContext, inputs: tuple[torch.Tensor, ...], targets: Any) -> dict[str, float]:
        out = ctx.forward(inputs)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(*inputs).softmax(dim=-1)
            loss = _kl(out, soft)
        else:
            loss = ctx.loss_fn(out, targets)
        loss.backward()
        return {"loss": float(loss.detach())}

    return step


def train_indicators(
    qmodel: QuantModel,
    data: Any,
    train: TrainOptions | None = None,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerFactory | None = None,
    checkpoint: str | Path | None = None,
    resume: bool | str | Path = False,
    **legacy: Any,
) -> Indicators:
    """Learn every layer's step sizes at every candidate bit in one joint run; returns them as Indicators.

    Each step (the LIMPQ scheme): for every candidate bit b, highest first, run the whole model at uniform
    b, compute the loss and backpropagate (gradients accumulate); then one random per-layer policy; then one
    optimizer step. `joint_passes="sandwich"` runs only the highest, one random middle and the lowest uniform
    pass (fewer passes per step; a middle bit-width's step sizes learn in the steps that draw it and from the
    random policies). `train` (fxmpq.TrainOptions) holds the settings: `indicator_epochs`, `lr`, `distill`, `seed`,
    ... (each as a keyword of its own, `epochs=` for `indicator_epochs`, still works for one release with a
    DeprecationWarning). With `distill`, the lower bits and the random policy learn from the highest bit's soft
    output (KL divergence over the last dim of the logits, in-place distillation) instead of the labels. `data`
    yields (inputs, targets) batches (a Dataset is wrapped in a DataLoader of `batch_size`). Default optimizer:
    SGD with momentum 0.9, `lr` for weights, `step_lr` (default `lr`) for step sizes, `weight_decay` on
    conv/linear weights only.
    A checkpoint is written atomically after each epoch and every `checkpoint_every` optimizer steps (None: at
    epoch ends only) when `checkpoint` is given; `resume=True` continues from it (or `resume=<path>`), mid-epoch
    where it was written there (the batches already seen in that epoch are skipped in the same order, with the
    same random state), and ends identical to an uninterrupted run on CPU. Under torch.distributed (torchrun) the model is wrapped in DDP; the
    earlier passes of a step accumulate under no_sync and the last one all-reduces. Before each optimizer
    step the gradients' total norm is clipped to `clip_grad_norm` when given, and a non-finite gradient
    raises DataError naming the parameters (so a diverging run stops before it corrupts the model). The quantizers are left
    switched as they were before the call.
    """
    t = fold_keywords("train_indicators", {"train": (TrainOptions, train)}, legacy,
                      aliases={"epochs": "indicator_epochs"})["train"]
    _expect_quant_model(qmodel, "train_indicators")
    check_joint_passes(t.joint_passes, "train_indicators")
    before = qmodel.policy
    try:
        run_training(
            qmodel,
            data,
            t,
            stage=Stage.INDICATORS,
            step_fn=_joint_step(t.distill, t.joint_passes),
            epochs=("indicator_epochs", t.indicator_epochs),
            lr=t.lr,
            cosine=False,
            optimizer=optimizer,
            loss_fn=loss_fn,
            checkpoint=checkpoint,
            resume=resume,
            extra_meta={
                "model_factory": t.model_factory,
                "model_kwargs": dict(t.model_kwargs or {}),
                "distill": t.distill,
                "joint_passes": t.joint_passes,
            },
        )
    finally:
        if before is None:
            qmodel.disable_quant()
        else:
            qmodel.set_policy(before)
    return indicators_from_model(qmodel)


def finetune(
    qmodel: QuantModel,
    data: Any,
    train: TrainOptions | None = None,
    *,
    distill_from: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerFactory | None = None,
    checkpoint: str | Path | None = None,
    resume: bool | str | Path = False,
    **legacy: Any,
) -> TrainStats:
    """LSQ quantization-aware training of weights and step sizes at the model's current policy.

    One forward per step at the policy in force (after `set_policy(...)`, fixed with `fix()` or not). With
    `distill_from` (an FP32 teacher nn.Module, put in eval mode and moved to the training device), the
    loss is the KL divergence to the teacher's soft output (softmax over the last dim) instead of `loss_fn`. Checkpoints carry what a tool needs to rebuild the model:
    candidate bits, the policy, the per-layer quantizer state, the hardware name and path, the example input
    shapes, `model_factory` ("package.module:function" or a torchvision/fxmpq.models name, stored as given)
    and `model_kwargs` (JSON-able keyword arguments for it), so that `fxmpq lower` rebuilds the model.
    `train` (fxmpq.TrainOptions): `finetune_epochs`, `finetune_lr` (None: `lr`), `cosine` (the default: the
    learning rate decays to 0 along a half cosine over the run's steps, as quantize() always fine-tuned; the old
    `cosine=` keyword defaulted to off), and the settings train_indicators reads; each as a keyword of its own
    (`epochs=` for `finetune_epochs`) still works for one release with a DeprecationWarning.
    """
    t = fold_keywords("finetune", {"train": (TrainOptions, train)}, legacy,
                      aliases={"epochs": "finetune_epochs"})["train"]
    if "cosine" not in legacy and train is None and legacy:
        t = dataclasses.replace(t, cosine=False)  # the old keywords keep the old default: a constant rate
    _expect_quant_model(qmodel, "finetune")
    if qmodel.policy is None:
        raise PolicyError("finetune: quantization is off; call qmodel.set_policy(policy) (or set_uniform) first")
    teacher = None
    if distill_from is not None:
        teacher = distill_from
        teacher.eval()
        teacher.to(pick_device(qmodel, t.device))
    return run_training(
        qmodel,
        data,
        t,
        stage=Stage.FINETUNE,
        step_fn=_plain_step(teacher),
        epochs=("finetune_epochs", t.finetune_epochs),
        lr=t.finetune_lr if t.finetune_lr is not None else t.lr,
        cosine=t.cosine,
        optimizer=optimizer,
        loss_fn=loss_fn,
        checkpoint=checkpoint,
        resume=resume,
        extra_meta={"model_factory": t.model_factory, "model_kwargs": dict(t.model_kwargs or {})},
    )
