"""Reference models the LIMPQ paper uses that torchvision lacks (MobileNetV1), and small nets for demos and tests."""

from __future__ import annotations

from .factory import build_model, parse_model_kwargs, resolve_factory
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .small import SmallMobileNet, SmallResNet, small_mobilenet, small_resnet

__all__ = ["MobileNetV1", "SmallMobileNet", "SmallResNet", "build_model", "mobilenet_v1", "parse_model_kwargs",
           "resolve_factory", "small_mobilenet", "small_resnet"]
