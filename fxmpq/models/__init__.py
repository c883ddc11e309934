"""Reference models the LIMPQ paper uses that torchvision lacks (MobileNetV1), a ViT whose projections are all
nn.Linear layers, small nets for demos and tests, and the side-by-side benchmark's deeper nets."""

from __future__ import annotations

from .bench_nets import InvertedResidualNet, ResNet20, mobilenet_v2_small, resnet20
from .factory import build_model, parse_model_kwargs, resolve_factory
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .small import SmallMobileNet, SmallResNet, small_mobilenet, small_resnet
from .vit import VisionTransformer, small_vit, vit_like

__all__ = ["InvertedResidualNet", "MobileNetV1", "ResNet20", "SmallMobileNet", "SmallResNet", "VisionTransformer", "build_model", "mobilenet_v1",
           "mobilenet_v2_small", "parse_model_kwargs", "resnet20", "resolve_factory", "small_mobilenet", "small_resnet", "small_vit", "vit_like"]
