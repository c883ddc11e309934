"""Tiny models for the tests: each exercises one kind of layer or one tracing situation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainCNN(nn.Module):
    """conv(3->8) BN ReLU, conv(8->16, stride 2) ReLU, global pooling, Linear(16->10); input 3x16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class ResidualNet(nn.Module):
    """A stem conv and one residual block whose conv1 and 1x1 shortcut read the same tensor; input 3x16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.conv2(F.relu(self.conv1(x)))
        x = F.relu(y + self.shortcut(x))
        return self.fc(x.mean((2, 3)))


class PoolResNet(nn.Module):
    """resnet18 in small: conv BN ReLU max pool, an identity block, a stride-2 block with a 1x1 downsample; 3x16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = F.relu(x + self.a2(F.relu(self.a1(x))))
        x = F.relu(self.b2(F.relu(self.b1(x))) + self.down(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FunctionalNet(nn.Module):
    """F.conv2d and F.linear with nn.Parameter weights, plus an F.conv2d whose weight is a buffer (not quantized)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
        self.conv_bias = nn.Parameter(torch.zeros(8))
        self.register_buffer("blur", torch.full((8, 1, 3, 3), 1 / 9))
        self.fc_weight = nn.Parameter(torch.randn(10, 8) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.conv_weight, self.conv_bias, padding=1))
        x = F.conv2d(x, self.blur, padding=1, groups=8)
        return F.linear(x.mean((2, 3)), self.fc_weight)


class GroupedNet(nn.Module):
    """A plain conv, a grouped conv (groups=2), a depthwise conv, a pointwise conv and a Linear; input 3x8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.grouped(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """Two Conv1d layers and a Linear on a 4-channel sequence of length 32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 5, stride=2, padding=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean(2))


class SharedLinearNet(nn.Module):
    """One Linear module called twice (its calls are two layers, "fc" and "fc#1")."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(F.relu(self.fc(x))))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the untraceable line
            return self.proj(x)
        return x


class UntraceableNet(nn.Module):
    """A conv, the untraceable Gate submodule (qualname "gate"), pooling and a Linear; input 3x8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


class TinyAttention(nn.Module):
    """One self-attention block on 4 tokens of width 8 (qkv and proj Linear, q @ k^T and attn @ v matmuls) and a
    linear head on the mean token; input 4x8."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(dim=-1)
        x = x + self.proj(attn @ v)
        return self.head(x.mean(dim=1))
