"""Reference models the LIMPQ paper uses that torchvision lacks (MobileNetV1), and small nets for demos and tests."""

from __future__ import annotations

from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .small import SmallMobileNet, SmallResNet, small_mobilenet, small_resnet

__all__ = ["MobileNetV1", "SmallMobileNet", "SmallResNet", "mobilenet_v1", "small_mobilenet", "small_resnet"]
