"""Build a model from a spec string: a torchvision name, a fxmpq.models name, or "package.module:function"."""

from __future__ import annotations

import difflib
import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..errors import ModelSpecError, brief, first_line
from .bench_nets import mobilenet_v2_small, resnet20
from .mobilenet_v1 import mobilenet_v1
from .small import small_mobilenet, small_resnet
from .vit import small_vit, vit_like

__all__ = ["build_model", "parse_model_kwargs", "resolve_factory"]

_OURS = ("mobilenet_v1", "mobilenet_v2_small", "resnet20", "small_mobilenet", "small_resnet", "small_vit", "vit_like")


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable `spec` names; imports a module for "pkg.mod:fn" (never evaluates text)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ModelSpecError(f"model {spec!r}: expected package.module:function")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelSpecError(f"model {spec!r}: cannot import {module_name!r} ({e})") from None
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if not callable(obj):
            raise ModelSpecError(f"model {spec!r}: {module_name} has no callable {attr!r}")
        return obj
    import torchvision  # heavy, and only needed for a torchvision name

    ours = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2_small": mobilenet_v2_small, "resnet20": resnet20,
            "small_mobilenet": small_mobilenet, "small_resnet": small_resnet, "small_vit": small_vit,
            "vit_like": vit_like}
    if spec in ours:
        return ours[spec]
    names = torchvision.models.list_models()
    if spec in names:
        return lambda **kw: torchvision.models.get_model(spec, weights=None, **kw)
    close = difflib.get_close_matches(spec.lower(), [*names, *_OURS], n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelSpecError(f"unknown model {spec!r}: expected a torchvision model name "
                         f"(torchvision.models.list_models()), one of fxmpq.models ({', '.join(_OURS)}), "
                         f"or package.module:function{hint}")


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory `spec` names with `kwargs`; ModelSpecError when it fails or returns no nn.Module."""
    factory = resolve_factory(spec)
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as e:  # a user's factory may raise anything: report it on one line, naming the spec
        raise ModelSpecError(f"model {spec!r}: the factory raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """A JSON object of factory keyword arguments (command lines, checkpoints); ModelSpecError otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"model kwargs {brief(text)}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError):  # an integer of more than 4300 digits, arrays nested too deeply
        raise ModelSpecError(f"model kwargs {brief(text)}: not readable JSON (a number with too many digits or "
                             f"arrays nested too deeply)") from None
    if not isinstance(value, dict):
        raise ModelSpecError(f"model kwargs {brief(text)}: expected a JSON object such as '{{\"num_classes\": 10}}'")
    return value
