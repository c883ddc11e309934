"""FP32 training for `fxmpq quantize --fp32-epochs`: the trained model a user would otherwise bring (--weights),
kept in the work directory so that a re-run starts from the same weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..core.atomic import atomic_path, remove_stale_temps
from ..core.workdir import FP32_WEIGHTS
from .data import load_weights, loader

log = logging.getLogger(__name__)

__all__ = ["FP32_WEIGHTS", "pretrained"]



def pretrained(model: nn.Module, spec: str, data: Dataset, path: Path, *, epochs: int, batch_size: int, seed: int,
               lr: float = 2e-3, progress: bool = True) -> nn.Module:
    """`model` with the FP32 weights at `path` when they are there (a previous run's), else trained `epochs` epochs
    on `data` (Adam, cross-entropy) and saved to `path` atomically; in eval mode."""
    remove_stale_temps(path.parent, (path.name,))  # a run killed while saving them
    if path.is_file():
        load_weights(model, path, spec)
        log.info("FP32 weights read from %s; FP32 training skipped", path)
        print(f"FP32 weights read from {path} (training skipped)")
        return model.eval()
    torch.manual_seed(seed)
    batches = loader(data, batch_size, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        total = 0.0
        bar = tqdm(batches, desc=f"fp32 {epoch + 1}/{epochs}", disable=not progress, leave=True)
        for x, y in bar:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        log.info("fp32 epoch %d/%d: loss %.3f", epoch + 1, epochs, total / max(len(batches), 1))
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()
