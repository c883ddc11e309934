"""The side-by-side benchmark's nets for 28x28 images, deep enough that a per-layer choice of bits matters:
an inverted-residual MobileNetV2-style net (32 searchable layers) and a ResNet-20 (19 convs and the head)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InvertedResidualNet", "ResNet20", "mobilenet_v2_small", "resnet20"]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion conv-BN-ReLU6 (skipped at expansion 1), 3x3 depthwise conv-BN-ReLU6,
    1x1 linear projection conv-BN; an identity shortcut when stride is 1 and the widths agree."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True), *_conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, output channels, blocks, first stride), as MobileNetV2's Table 2 but for 28x28 inputs.
SETTINGS: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 48, 2, 1),
                                                   (4, 64, 2, 1))


class InvertedResidualNet(nn.Module):
    """A 3x3 stem, ten inverted-residual blocks, a 1x1 conv to `last` channels, pooling and a Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, last: int = 128):
        super().__init__()
        scale = width / 16
        cin = width
        blocks: list[nn.Module] = []
        for t, c, n, s in SETTINGS:
            cout = max(8, round(c * scale))
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True))
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; the shortcut is parameter-free (ResNet paper's option A: subsample and pad with
    zero channels), so ResNet-20 has exactly 19 convs."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(cin, cout, 3, stride))
        self.conv2 = nn.Sequential(*_conv_bn(cout, cout, 3))
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20: a 3x3 stem, three stages of three basic blocks (width, 2x, 4x), pooling, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                layers.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mobilenet_v2_small(num_classes: int = 10, in_channels: int = 1, width: int = 16, last: int = 128) -> InvertedResidualNet:
    """A MobileNetV2-style net for 28x28 inputs: stem, 10 inverted-residual blocks (expansion, depthwise and
    projection convs), a 1x1 conv and a Linear: 31 convs and the Linear (10 of the convs depthwise)."""
    return InvertedResidualNet(num_classes=num_classes, in_channels=in_channels, width=width, last=last)


def resnet20(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> ResNet20:
    """ResNet-20 (He et al., 2016, CIFAR variant) for 28x28 or 32x32 inputs: 19 convs and the Linear, 0.27 M parameters."""
    return ResNet20(num_classes=num_classes, in_channels=in_channels, width=width)
