"""Helpers the tools share: plain FP32 training (the model a user would bring) and a quiet, reproducible setup."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fxmpq.core.datasets import ImageData


def train_fp32(model: torch.nn.Module, data: ImageData, epochs: int, *, limit: int | None = None, seed: int = 0,
               batch_size: int = 128, lr: float = 0.1, log: bool = True) -> None:
    """FP32 training with SGD (Nesterov momentum, weight decay 5e-4) and a one-cycle schedule; leaves eval mode."""
    torch.manual_seed(seed)
    loader = data.loader("train", batch_size, limit=limit, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(loader)))
    model.train()
    for epoch in range(epochs):
        t, total = time.time(), 0.0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if log:
            print(f"  fp32 epoch {epoch + 1}/{epochs}: loss {total / len(loader):.3f} ({time.time() - t:.0f} s)")
    model.eval()
