"""DDP-aware plumbing of the training loop: the process group, the device a rank trains on, and its data loader."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..core.batches import check_reiterable
from ..core.devices import as_device
from ..errors import DataError
from ..quant.quant_model import QuantModel

log = logging.getLogger(__name__)

__all__ = ["dist_on", "make_loader", "pick_device", "rank", "world_size"]


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world_size() -> int:
    return dist.get_world_size() if dist_on() else 1


def pick_device(qmodel: QuantModel, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return as_device(device)
    if dist_on() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % max(torch.cuda.device_count(), 1))))
    p = next(qmodel.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_loader(data: Any, *, batch_size: int, seed: int, what: str = "data") -> Iterable[Any]:
    """`data` as an iterable of batches; a Dataset gets a DataLoader; under DDP a DistributedSampler.

    A one-shot iterator is refused (DataError): epochs after the first and a resume need the data again."""
    check_reiterable(data, what)
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        sampler = (DistributedSampler(data, shuffle=True, seed=seed) if dist_on() else RandomSampler(data))
        return DataLoader(data, batch_size=batch_size, sampler=sampler)
    if isinstance(data, DataLoader) and dist_on() and not isinstance(data.sampler, DistributedSampler) \
            and not isinstance(data.dataset, torch.utils.data.IterableDataset):
        shuffle = isinstance(data.sampler, RandomSampler)
        log.info("rank %d: giving the DataLoader a DistributedSampler (shuffle=%s)", rank(), shuffle)
        return DataLoader(data.dataset, batch_size=data.batch_size, drop_last=data.drop_last,
                          sampler=DistributedSampler(data.dataset, shuffle=shuffle, seed=seed),
                          num_workers=data.num_workers, collate_fn=data.collate_fn, pin_memory=data.pin_memory)
    if not isinstance(data, Iterable):
        raise DataError(f"data must be an iterable of (inputs, targets) batches or a Dataset, "
                        f"found {type(data).__name__}")
    return data
