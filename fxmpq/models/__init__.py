"""Reference models the LIMPQ paper uses that torchvision lacks (MobileNetV1), a ViT whose projections are all
nn.Linear layers, and small nets for demos and tests."""

from __future__ import annotations

from .factory import build_model, parse_model_kwargs, resolve_factory
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .small import SmallMobileNet, SmallResNet, small_mobilenet, small_resnet
from .vit import VisionTransformer, small_vit, vit_like

__all__ = ["MobileNetV1", "SmallMobileNet", "SmallResNet", "VisionTransformer", "build_model", "mobilenet_v1",
           "parse_model_kwargs", "resolve_factory", "small_mobilenet", "small_resnet", "small_vit", "vit_like"]
