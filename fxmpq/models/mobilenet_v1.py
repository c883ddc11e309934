"""MobileNetV1 (Howard et al., 2017): the ImageNet network the LIMPQ paper quantizes and torchvision lacks."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MobileNetV1", "mobilenet_v1"]

# (output channels, stride) of the 13 depthwise-separable blocks (Howard et al., arXiv:1704.04861, Table 1).
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Sequential):
    """A 3x3 depthwise conv (BN, ReLU) followed by a 1x1 pointwise conv (BN, ReLU)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = _conv_bn_relu(cin, cin, 3, stride, groups=cin)
        self.pointwise = _conv_bn_relu(cin, cout, 1, 1)


class MobileNetV1(nn.Module):
    """MobileNetV1: a 3x3 stride-2 stem, 13 depthwise-separable blocks, global average pooling, one Linear."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, found {width_mult}")

        def ch(c: int) -> int:
            return max(8, int(c * width_mult))

        layers: list[nn.Module] = [_conv_bn_relu(in_channels, ch(32), 3, 2)]
        cin = ch(32)
        for cout, stride in BLOCKS:
            layers.append(DepthwiseSeparable(cin, ch(cout), stride))
            cin = ch(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def mobilenet_v1(num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.0) -> MobileNetV1:
    """The standard ImageNet MobileNetV1 (1.0, 224): 4.23 M parameters, 569 M MACs at 224x224.

    Randomly initialised (no pretrained weights are shipped).
    """
    return MobileNetV1(num_classes=num_classes, width_mult=width_mult, in_channels=in_channels, dropout=dropout)
