"""Small CNNs for 1x28x28 (MNIST-like) or 3x32x32 (CIFAR-like) inputs, used by demos, tests and benchmarks."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallMobileNet", "SmallResNet", "small_mobilenet", "small_resnet"]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, as in ResNet."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A first 3x3 conv, three residual stages (width, 2x, 4x; the last two stride 2), pooling and a Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class DepthwiseSeparable(nn.Sequential):
    """A 3x3 depthwise conv-BN-ReLU followed by a 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            _conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU(inplace=True),
            _conv_bn(cin, cout, 1), nn.ReLU(inplace=True),
        )


class SmallMobileNet(nn.Module):
    """A first 3x3 conv, five depthwise-separable blocks (two of them stride 2), pooling and a Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn(in_channels, w, 3), nn.ReLU(inplace=True))
        self.features = nn.Sequential(
            DepthwiseSeparable(w, 2 * w),
            DepthwiseSeparable(2 * w, 4 * w, stride=2),
            DepthwiseSeparable(4 * w, 4 * w),
            DepthwiseSeparable(4 * w, 8 * w, stride=2),
            DepthwiseSeparable(8 * w, 8 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def small_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> SmallResNet:
    """A residual CNN for 28x28 or 32x32 inputs: 7 convs + 2 shortcut convs + 1 Linear, ~78 k params at width 16."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, width=width)


def small_mobilenet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> SmallMobileNet:
    """A MobileNet-style CNN for 28x28 or 32x32 inputs: 1 conv + 5 depthwise-separable blocks + 1 Linear (~37 k params at width 16)."""
    return SmallMobileNet(num_classes=num_classes, in_channels=in_channels, width=width)
