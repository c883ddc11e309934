"""Tiny models for the fake-quant, training and DDP tests (kept here so these tests need no other helper's file)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """conv-bn-relu x3 with a residual add, global pooling and a linear head (first/last layers pinned)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))  # signed: a BN output added in
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class FunctionalNet(nn.Module):
    """Layers called functionally with parameter weights, and one Conv2d module called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 4, 1, 1) * 0.3)
        self.head_weight = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.head_bias = nn.Parameter(torch.zeros(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = self.shared(x)
        x = F.conv2d(x, self.w)
        return F.linear(x.mean((2, 3)), self.head_weight, self.head_bias)


def random_batches(n: int, batch: int = 4, shape: tuple[int, ...] = (3, 8, 8), classes: int = 10,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (inputs, targets) batches of random data from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]
