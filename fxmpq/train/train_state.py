"""The resumable state of a training run: checkpoints of model, optimizer and every random generator, and where the
run stands, so that a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import dataclasses
import enum
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..core.checkpoint import join_state, load_checkpoint, save_checkpoint, split_state
from ..errors import CheckpointError, PolicyError, first_line
from ..quant.quant_model import QuantModel
from .ddp import dist_on, rank, world_size

log = logging.getLogger(__name__)

__all__ = ["Position", "Stage", "checkpoint_meta", "loader_generators", "restore_model_state", "restore_state",
           "rng_state", "save_state", "set_rng_state"]


class Stage(enum.StrEnum):
    """Which training wrote a checkpoint (its meta "kind" holds the value): joint indicator training or fine-tuning."""

    INDICATORS = "indicators"
    FINETUNE = "finetune"


@dataclass
class Position:
    """Where a run stands: epochs completed, optimizer steps, batches consumed of the current epoch and their
    summed losses (a checkpoint written mid-epoch resumes there, bit for bit)."""

    epoch: int = 0
    step: int = 0
    batch: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    epoch_rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # the random state the epoch began with
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # the random state after `step`


def loader_generators(loader: Iterable[Any]) -> list[torch.Generator]:
    """The torch.Generators a DataLoader draws its order from (its own, its sampler's), each once, in a fixed order.

    Their states belong to the run's random state: a loader built with generator=g (fxmpq.core.datasets) advances g
    every epoch, so a resumed run must put g where it was."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and g.device.type == "cpu" and all(g is not h for h in found):
            found.append(g)
    return found


def rng_state(device: torch.device, gens: list[torch.Generator], prefix: str = "rng"
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"{prefix}/torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors[f"{prefix}/cuda"] = torch.cuda.get_rng_state(device)
    for i, g in enumerate(gens):
        tensors[f"{prefix}/loader{i}"] = g.get_state()
    np_state = np.random.get_state()
    tensors[f"{prefix}/numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"python": [py_version, list(py_state), py_gauss],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "loader_generators": len(gens)}
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], device: torch.device,
                   gens: list[torch.Generator], prefix: str = "rng") -> None:
    torch.set_rng_state(tensors[f"{prefix}/torch"])
    if device.type == "cuda" and f"{prefix}/cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"{prefix}/cuda"], device)
    saved = int(meta.get("loader_generators", 0))
    if saved != len(gens):
        log.warning("the data loader draws from %d generator(s), the checkpoint holds %d: the data order after "
                    "resuming may differ from the interrupted run's", len(gens), saved)
    for i, g in enumerate(gens[:saved]):
        g.set_state(tensors[f"{prefix}/loader{i}"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors[f"{prefix}/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


@dataclass(frozen=True)
class ModelMeta:
    """What a training checkpoint records to rebuild its model: the one schema `checkpoint_meta` writes and
    `ModelMeta.read` reads (restore, `fxmpq lower`). `hardware` is {"name", "path"}; `policy` None before one is set."""

    model_factory: str | None
    model_kwargs: Mapping[str, Any]
    example_shapes: list[list[int]]
    bits: list[int]
    act_bits: list[int]
    per_channel: bool
    hardware: Mapping[str, Any]
    policy: Mapping[str, list[int | None]] | None

    @classmethod
    def read(cls, meta: Mapping[str, Any], where: str) -> ModelMeta:
        """The schema's fields from a checkpoint's metadata; CheckpointError naming `where` and the key."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
        if missing:
            raise CheckpointError(f"{where}: not written by fxmpq's training (its metadata lacks {', '.join(missing)})")
        for key, kind in (("model_kwargs", Mapping), ("example_shapes", list), ("bits", list), ("act_bits", list),
                          ("hardware", Mapping)):
            if not isinstance(meta[key], kind):
                raise CheckpointError(f"{where}: metadata {key!r} must be {'an object' if kind is Mapping else 'a list'}, "
                                      f"found {type(meta[key]).__name__}")
        if meta["policy"] is not None and not isinstance(meta["policy"], Mapping):
            raise CheckpointError(f"{where}: metadata 'policy' must be an object or null")
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})


def checkpoint_meta(qmodel: QuantModel, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint metadata of `qmodel`: ModelMeta's fields (model_factory and model_kwargs from `extra`) and its
    quantizers' state."""
    hw = qmodel.analysis.hardware
    policy = qmodel.policy
    fields = ModelMeta(model_factory=extra.get("model_factory"), model_kwargs=dict(extra.get("model_kwargs") or {}),
                       example_shapes=[list(s) for s in qmodel.example_shapes], bits=list(qmodel.bits),
                       act_bits=list(qmodel.act_bits), per_channel=qmodel.per_channel,
                       hardware={"name": hw.name, "path": hw.path},
                       policy={n: list(p) for n, p in policy.items()} if policy is not None else None)
    return {**dataclasses.asdict(fields), "quant_state": qmodel.quant_state()}


def save_state(path: Path, qmodel: QuantModel, opt: torch.optim.Optimizer, *, stage: Stage, epoch: int, step: int,
          epochs: int, seed: int, dev: torch.device, extra_meta: Mapping[str, Any], batch: int = 0,
          sums: Mapping[str, float] | None = None, epoch_rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
          gens: list[torch.Generator] | None = None) -> None:
    """Write the run's state: model, optimizer, random state, and where it stands (`batch` batches into the epoch
    after the `epoch` completed ones, with their summed losses and the random state the epoch began with)."""
    if rank() == 0:
        model_t, model_s = split_state(qmodel.state_dict(), "model")
        opt_t, opt_s = split_state(opt.state_dict(), "optim")
        rng_t, rng_m = rng_state(dev, gens or [])
        meta = {"kind": stage.value, "epoch": epoch, "step": step, "epochs": epochs, "seed": seed,
                "world_size": world_size(), **checkpoint_meta(qmodel, extra_meta),
                "model_state": model_s, "optim_state": opt_s, "rng": rng_m,
                "batch": batch, "sums": dict(sums or {})}
        tensors = {**model_t, **opt_t, **rng_t}
        if batch:
            if epoch_rng is None:
                raise CheckpointError(f"{path}: a mid-epoch checkpoint needs the random state the epoch began with")
            tensors.update(epoch_rng[0])
            meta["epoch_rng"] = epoch_rng[1]
        save_checkpoint(path, tensors, meta)
        log.info("%s: checkpoint %s (epoch %d, batch %d, step %d)", stage, path, epoch, batch, step)
    if dist_on():
        dist.barrier()


def _load_for(path: Path, qmodel: QuantModel, stage: Stage) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint at `path` with its model state loaded into `qmodel`, after checking it is `stage`'s and has
    the model's candidate bits; CheckpointError naming the file otherwise."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != stage.value:
        raise CheckpointError(f"{path}: written by {meta.get('kind')!r} training, cannot resume {stage.value!r} from it")
    if list(meta.get("bits", [])) != list(qmodel.bits) or list(meta.get("act_bits", meta.get("bits", []))) != list(
            qmodel.act_bits):
        raise CheckpointError(f"{path}: candidate bits {meta.get('bits')} (activations "
                              f"{meta.get('act_bits', meta.get('bits'))}) differ from the model's {list(qmodel.bits)} "
                              f"(activations {list(qmodel.act_bits)})")
    _fit(path, lambda: qmodel.load_state_dict(join_state(meta["model_state"], tensors, str(path))))
    return tensors, meta


def _fit(path: Path, load: Any) -> Any:
    """Run `load`; a state that does not fit becomes a CheckpointError naming the file."""
    try:
        return load()
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, PolicyError) as e:
        raise CheckpointError(f"{path}: checkpoint does not fit this model/optimizer ({type(e).__name__}: "
                              f"{first_line(e)})") from None


def restore_state(path: Path, qmodel: QuantModel, opt: torch.optim.Optimizer, *, stage: Stage,
                  dev: torch.device) -> Position:
    """Load model, optimizer and position from the `stage` checkpoint at `path`; where the run resumes."""
    tensors, meta = _load_for(path, qmodel, stage)

    def position() -> Position:
        opt.load_state_dict(join_state(meta["optim_state"], tensors, str(path)))
        pos = Position(epoch=int(meta["epoch"]), step=int(meta["step"]), batch=int(meta.get("batch", 0)),
                       sums={str(k): float(v) for k, v in meta.get("sums", {}).items()},
                       rng=(tensors, meta["rng"]))
        if pos.batch:
            pos.epoch_rng = (tensors, meta["epoch_rng"])
        return pos

    pos = _fit(path, position)
    qmodel.to(dev)
    if meta.get("policy") is not None:
        qmodel.set_policy({n: tuple(p) for n, p in meta["policy"].items()})
    log.info("%s: resumed from %s at epoch %d, batch %d, step %d", stage, path, pos.epoch, pos.batch, pos.step)
    return pos


def restore_model_state(qmodel: QuantModel, path: str | Path, stage: Stage) -> dict[str, Any]:
    """Load the model state (weights, BatchNorm statistics, step sizes) of a `stage` checkpoint into `qmodel`; its
    metadata. The quantizers are left switched as the checkpoint had them. CheckpointError naming the file when it
    is corrupt, from another stage, or does not fit the model."""
    return _load_for(Path(path), qmodel, stage)[1]
