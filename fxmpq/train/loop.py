"""The one DDP-aware, resumable training loop that joint indicator training and LSQ fine-tuning share
(fxmpq/train/trainings.py holds the two and their step functions): optimizer, cosine schedule, gradient checks,
checkpoints at a position (stage, epoch, batch, random state) that only this loop defines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..core.atomic import check_writable, remove_stale_temps
from ..core.batches import split_batch
from ..core.options import CHECKPOINT_EVERY, TrainOptions
from ..cost.policy import Policy
from ..errors import ArgumentError, CheckpointError, DataError, PolicyError, first_line
from ..policy_search.indicators import Indicators
from ..quant.quant_model import QuantModel
from .allocator import keep_freed_memory, release_freed_memory
from .ddp import dist_on, make_loader, pick_device, rank, world_size
from .train_state import (
    Position,
    Stage,
    loader_generators,
    restore_state,
    rng_state,
    save_state,
    set_rng_state,
)

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_EVERY", "StepFn", "TrainStats", "indicators_from_model", "random_policy", "run_training"]


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


@dataclass(frozen=True)
class TrainStats:
    """What a training run did: epochs completed, optimizer steps, and the last epoch's mean losses."""

    epochs: int
    steps: int
    losses: Mapping[str, float] = field(default_factory=dict)
    checkpoint: str | None = None


# ------------------------------------------------------------------------------------------- indicators
def indicators_from_model(qmodel: QuantModel) -> Indicators:
    """The learned step sizes of every searchable layer at every candidate bit, as Indicators.

    Weights: the per-tensor step size, or the mean over output channels for a per-channel quantizer.
    Activations: the input quantizer's step size. Pinned layers are left out (their bits are fixed).
    """
    names = qmodel.searchable_names
    weight, act = {}, {}
    for n in names:
        wq, aq = qmodel.weight_quantizer(n), qmodel.act_quantizer(n)
        weight[n] = {b: float(wq.step_size(b).detach().float().mean()) for b in wq.bits}
        act[n] = {b: float(aq.step_size(b).detach().float().mean()) for b in aq.bits}
    meta = {"hardware": qmodel.analysis.hardware.name, "source": "fxmpq.train_indicators"}
    return Indicators(layers=tuple(names), bits=qmodel.all_bits, weight=weight, act=act, meta=meta)


def random_policy(qmodel: QuantModel, rng: random.Random) -> Policy:
    """Each searchable layer a random (w, a) among the hardware's pairs within the candidate bits."""
    pairs = [p for p in qmodel.analysis.hardware.pairs if p[0] in qmodel.bits and p[1] in qmodel.act_bits]
    if not pairs:
        raise PolicyError(f"hardware {qmodel.analysis.hardware.name!r} runs no (w, a) pair within the "
                          f"candidate bits {qmodel.bits}")
    return Policy({n: rng.choice(pairs) for n in qmodel.searchable_names})


def _expect_quant_model(qmodel: Any, where: str) -> None:
    if not isinstance(qmodel, QuantModel):
        raise ArgumentError(f"{where}: expected a QuantModel (from fxmpq.prepare), found {type(qmodel).__name__}")


# ------------------------------------------------------------------------------------------- DDP helpers
def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class _StepContext:
    """What a step function sees: the model to call (DDP-wrapped or not), the QuantModel to switch, the loss."""

    net: nn.Module
    qmodel: QuantModel
    loss_fn: LossFn
    seed: int
    step: int = 0
    where: str = ""

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Accumulate gradients locally except on the step's last backward (DDP's no_sync)."""
        if isinstance(self.net, DistributedDataParallel) and not last:
            return self.net.no_sync()
        return contextlib.nullcontext()

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The model on one batch; a failing forward is a DataError naming the batch (never torch's traceback)."""
        try:
            return self.net(*inputs)
        except Exception as e:
            shapes = ", ".join(f"Tensor{tuple(x.shape)} {x.dtype}" for x in inputs)
            raise DataError(f"{self.where}: the model fails on the batch (inputs {shapes}): {type(e).__name__}: "
                            f"{first_line(e)}") from e


StepFn = Callable[[_StepContext, tuple[torch.Tensor, ...], Any], dict[str, float]]


def _param_groups(qmodel: QuantModel, lr: float, step_lr: float | None, weight_decay: float) -> list[dict[str, Any]]:
    steps = {id(p) for p in qmodel.step_parameters()}
    params = [p for p in qmodel.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in steps], "lr": step_lr if step_lr is not None else lr,
         "weight_decay": 0.0, "name": "step_sizes"},
        {"params": [p for p in params if id(p) not in steps and p.dim() > 1], "lr": lr,
         "weight_decay": weight_decay, "name": "weights"},
        {"params": [p for p in params if id(p) not in steps and p.dim() <= 1], "lr": lr,
         "weight_decay": 0.0, "name": "bias_bn"},
    ]
    return [g for g in groups if g["params"]]


def run_training(
    qmodel: QuantModel,
    data: Any,
    t: TrainOptions,
    *,
    stage: Stage,
    step_fn: StepFn,
    epochs: tuple[str, int],
    lr: float,
    cosine: bool,
    optimizer: OptimizerFactory | None,
    loss_fn: LossFn | None,
    checkpoint: str | Path | None,
    resume: bool | str | Path,
    extra_meta: Mapping[str, Any],
) -> TrainStats:
    """The one training loop: data checks, device, DDP, epochs, optimizer steps, progress, checkpoints, resume.
    `t` holds the settings both trainings share; `epochs` (the field's name, for messages, and its value), `lr`
    and `cosine` are the stage's own."""
    _expect_quant_model(qmodel, stage)
    _check_counts(stage, **{epochs[0]: epochs[1]}, max_steps=t.max_steps, batch_size=t.batch_size,
                  checkpoint_every=t.checkpoint_every)
    dev = pick_device(qmodel, t.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dev.type == "cpu":
        keep_freed_memory()  # the fake-quant step's fresh tensors otherwise page-fault every step (allocator.py)
    qmodel.to(dev)
    loader = make_loader(data, batch_size=t.batch_size, seed=t.seed, what=f"{stage}: data")
    if checkpoint is not None:
        check_writable(checkpoint, f"{stage}: checkpoint")
        remove_stale_temps(Path(checkpoint).parent, [Path(checkpoint).name])
    resume_path = None
    if resume:
        resume_path = Path(checkpoint) if resume is True else Path(resume)
        if resume is True and (checkpoint is None or not resume_path.exists()):
            if checkpoint is None:
                raise CheckpointError(f"{stage}: resume=True needs checkpoint= (the file to resume from)")
            log.info("%s: no checkpoint at %s yet, starting from scratch", stage, resume_path)
            resume_path = None
    py_state, np_state = random.getstate(), np.random.get_state()
    fork_devices = [dev] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            return _loop(
                qmodel,
                loader,
                t,
                stage=stage,
                step_fn=step_fn,
                epochs=epochs[1],
                lr=lr,
                cosine=cosine,
                optimizer=optimizer,
                loss_fn=loss_fn,
                dev=dev,
                checkpoint=checkpoint,
                resume_path=resume_path,
                extra_meta=extra_meta,
                gens=loader_generators(loader),
            )
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        release_freed_memory()


def _check_counts(stage: Stage, **counts: int | None) -> None:
    """ArgumentError for a count that is not an integer or out of range (epochs, max_steps >= 0; the rest >= 1)."""
    for name, value in counts.items():
        if value is None and name in ("max_steps", "checkpoint_every"):
            continue
        least = 0 if name.endswith("epochs") or name == "max_steps" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ArgumentError(f"{stage}: {name} must be an integer >= {least}, found {value!r}")


def _loop(
    qmodel: QuantModel,
    loader: Iterable[Any],
    t: TrainOptions,
    *,
    stage: Stage,
    step_fn: StepFn,
    epochs: int,
    lr: float,
    cosine: bool,
    optimizer: OptimizerFactory | None,
    loss_fn: LossFn | None,
    dev: torch.device,
    checkpoint: str | Path | None,
    resume_path: Path | None,
    extra_meta: Mapping[str, Any],
    gens: list[torch.Generator] | None = None,
) -> TrainStats:
    gens = gens or []
    seed, max_steps, progress, clip_grad_norm, checkpoint_every = (
        t.seed,
        t.max_steps,
        t.progress,
        t.clip_grad_norm,
        t.checkpoint_every,
    )
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    groups = _param_groups(qmodel, lr, t.step_lr, t.weight_decay)
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = optimizer(groups) if optimizer is not None else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    pos = Position()
    if resume_path is not None:
        pos = restore_state(resume_path, qmodel, opt, stage=stage, dev=dev)
        if pos.batch == 0 and pos.rng is not None:
            set_rng_state(*pos.rng, dev, gens)
    net: nn.Module = qmodel
    if dist_on() and world_size() > 1:
        net = DistributedDataParallel(qmodel, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=True)
    total_steps = _total_steps(loader, epochs, max_steps) if cosine else None
    params = [p for g in opt.param_groups for p in g["params"]]
    ctx = _StepContext(net=net, qmodel=qmodel, loss_fn=loss_fn or F.cross_entropy, seed=seed, step=pos.step)
    shapes = qmodel.example_shapes
    classes = qmodel.classes if loss_fn is None else None  # cross-entropy: targets must index the outputs
    qmodel.train()
    epoch_losses: dict[str, float] = {}
    done, step = pos.epoch, pos.step
    path = Path(checkpoint) if checkpoint is not None else None

    def save(epoch_done: int, batch: int, sums: dict[str, float], epoch_rng: Any) -> None:
        if path is not None:
            save_state(path, qmodel, opt, stage=stage, epoch=epoch_done, step=step, epochs=epochs, seed=seed, dev=dev,
                  extra_meta=extra_meta, batch=batch, sums=sums, epoch_rng=epoch_rng if batch else None, gens=gens)

    for epoch in range(pos.epoch, epochs):
        if max_steps is not None and step >= max_steps:
            break
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        skip = pos.batch if epoch == pos.epoch else 0
        if skip:  # resuming mid-epoch: the epoch's data order, then the random state after the last step taken
            set_rng_state(*pos.epoch_rng, dev, gens, prefix="epoch_rng")
        epoch_rng = rng_state(dev, gens, prefix="epoch_rng") if path is not None else None
        batches = iter(loader)
        for k in range(skip):
            if next(batches, _END) is _END:
                raise CheckpointError(f"{resume_path}: the checkpoint stopped after batch {skip} of epoch "
                                      f"{epoch + 1}, but the data has only {k} batches per epoch; resume with the "
                                      f"data the run was started with")
        if skip:
            set_rng_state(*pos.rng, dev, gens)
        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(batches, total=total, initial=skip, desc=f"{stage} {epoch + 1}/{epochs}", leave=True,
                   disable=not progress or rank() != 0, dynamic_ncols=True)
        sums: dict[str, float] = dict(pos.sums) if skip else {}
        n = skip
        stopped = False
        for i, batch in enumerate(bar, start=skip):
            inputs, targets = split_batch(batch, i, shapes, what=f"{stage}: data", classes=classes)
            inputs, targets = _to(inputs, dev), _to(targets, dev)
            ctx.step = step
            ctx.where = f"{stage}: step {step} (epoch {epoch + 1}, batch {i})"
            opt.zero_grad(set_to_none=True)
            losses = step_fn(ctx, inputs, targets)
            bad = [k for k, v in losses.items() if not math.isfinite(v)]
            if bad:
                raise DataError(f"{stage}: loss became non-finite at step {step} (epoch {epoch + 1}, batch {i}) "
                                f"for {', '.join(bad)}; lower lr (now {lr}) or check the data")
            _check_gradients(qmodel, params, clip_grad_norm, stage=stage, step=step, lr=lr)
            if total_steps:
                _set_cosine_lr(opt, step, total_steps)
            opt.step()
            qmodel.clamp_step_sizes()
            step += 1
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            if max_steps is not None and step >= max_steps:
                stopped = True
                break
            if checkpoint_every and step % checkpoint_every == 0 and (total is None or n < total):
                save(done, n, sums, epoch_rng)  # mid-epoch (the epoch's end writes its own)
        if n:  # the bar's last line keeps the epoch's mean loss per bit-width (whatever the refresh timing)
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items()}, refresh=True)
        bar.close()
        if n == 0:
            raise DataError(f"{stage}: the data yielded no batch in epoch {epoch + 1}")
        epoch_losses = {k: v / n for k, v in sums.items()}
        log.info("%s epoch %d/%d: %d steps, mean losses %s", stage, epoch + 1, epochs, n,
                 ", ".join(f"{k}={v:.4f}" for k, v in epoch_losses.items()))
        if stopped:
            save(done, n, sums, epoch_rng)
            break
        done = epoch + 1
        save(done, 0, {}, None)
    return TrainStats(epochs=done, steps=step, losses=epoch_losses,
                      checkpoint=str(checkpoint) if checkpoint is not None else None)


_END = object()


def _check_gradients(qmodel: QuantModel, params: list[torch.Tensor], clip: float | None, *, stage: Stage, step: int,
                     lr: float) -> None:
    """Clip the gradients' total norm to `clip` (when given); DataError naming the parameters whose gradient is
    not finite, before the optimizer step spreads it into the model."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    grads = [p.grad.detach() for p in with_grad]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())  # one fused pass per step
    if not bool(torch.isfinite(total)):
        # again in float64: float32 gradients of 1e20 (random-init nets on tiny batches) are finite, their squares not
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))
    if clip is not None:
        coef = (clip / (total + 1e-12)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in with_grad], coef.to(with_grad[0].grad.dtype))
    if not bool(torch.isfinite(total)):
        names = {id(p): n for n, p in qmodel.named_parameters()}
        bad = [names.get(id(p), "?") for p in with_grad if not bool(torch.isfinite(p.grad).all())]
        raise DataError(f"{stage}: gradients became non-finite at step {step} in {len(bad)} parameter(s) "
                        f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); lower lr (now {lr}), set "
                        f"clip_grad_norm, or use larger batches (BatchNorm on tiny batches explodes)")


def _total_steps(loader: Iterable[Any], epochs: int, max_steps: int | None) -> int | None:
    """Optimizer steps the run will take (for the cosine schedule), or None when the data has no length."""
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    total = epochs * per_epoch if per_epoch is not None else None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    if total is None:
        log.warning("cosine learning rate needs data with a length or max_steps; keeping lr constant")
    return total


def _set_cosine_lr(opt: torch.optim.Optimizer, step: int, total: int) -> None:
    """lr = base_lr * (1 + cos(pi * step / total)) / 2: a function of the step count alone, so resume is exact."""
    factor = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    for g in opt.param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * factor
