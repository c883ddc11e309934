"""Capture: trace a model with torch.fx, propagate the example inputs' shapes, and record its quantizable layers."""

from __future__ import annotations

import copy
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import TraceError
from .matcher import find_layers

log = logging.getLogger(__name__)

__all__ = ["as_input_tuple", "propagate_shapes", "trace"]


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise `example_inputs` (a tensor or a sequence of positional inputs) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of positional inputs, found {type(example_inputs).__name__}"
    )


class _Tracer(fx.Tracer):
    """A symbolic tracer that keeps user-named leaf modules opaque and remembers where it is."""

    def __init__(self, leaf_modules: Sequence[str | type[nn.Module]] = ()):
        super().__init__()
        self.leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self.stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.stack.append((self.path_of_module(m), type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


_LIBRARY_DIRS = tuple(str(Path(m.__file__).resolve().parent) + os.sep for m in (torch, sys.modules[__package__]))


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and fxmpq, where the untraceable code lives.

    Frames are matched by the installed package directories (not by a "/fxmpq/" substring, which would also hide
    user code in a checkout or project folder that happens to be called fxmpq).
    """
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        f = str(Path(fr.filename).resolve()) if not fr.filename.startswith("<") else fr.filename
        if not f.startswith(_LIBRARY_DIRS) and not f.startswith("<"):
            return f"{fr.name}() at {fr.filename}:{fr.lineno}"
    return ""


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
) -> fx.GraphModule:
    """Capture `model` as an fx.GraphModule with shapes in node.meta and a LayerRecord on every quantizable layer.

    The user's model is not touched.
    The model is deep-copied first, so tracing and shape propagation (run in eval mode without gradients)
    change neither its parameters nor its BatchNorm statistics. Modules named in `leaf_modules` (qualnames or
    types) are kept as one opaque call; their layers are then not quantized.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module to trace, found {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    model = copy.deepcopy(model)
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # torch.fx raises many types; each becomes a TraceError naming where
        where = ""
        if tracer.stack:
            qual, typ = tracer.stack[-1]
            where = f" in module '{qual or '<root>'}' ({typ})"
        frame = _user_frame(e)
        hint_target = f"'{tracer.stack[-1][0]}'" if tracer.stack and tracer.stack[-1][0] else "<SubmoduleName>"
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}{where}"
            f"{' at ' + frame if frame else ''}: {type(e).__name__}: {e}. "
            f"Mark the offending submodule a leaf so it is kept as one opaque call (its layers are then not "
            f"quantized): fxmpq.trace(model, inputs, leaf_modules=[{hint_target}]), or make the code traceable "
            f"(no Python control flow on tensor values)."
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    was_training = model.training
    gm.eval()
    try:
        propagate_shapes(gm, inputs)
    except _NodeFailure as f:
        e = f.__cause__
        raise TraceError(
            f"running the traced {type(model).__name__} on the example inputs failed at node {f.node.name} "
            f"({f.node.format_node()}): {type(e).__name__}: {_first_line(e)}. Check that example_inputs have "
            f"the shape and dtype the model expects (got {[_describe(x) for x in inputs]})."
        ) from e
    finally:
        gm.train(was_training)
    find_layers(gm)
    return gm


class _NodeFailure(Exception):
    """A node failed while shapes were propagated; the original exception is the cause."""

    def __init__(self, node: fx.Node):
        super().__init__(node.format_node())
        self.node = node


class _ShapeProp(fx.Interpreter):
    """torch.fx's ShapeProp without its printed traceback: a failing node raises _NodeFailure naming it."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise _NodeFailure(n) from e
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        tm = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tm
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Run `gm` on `inputs` without gradients, recording every node's tensor_meta (shape, dtype)."""
    with torch.no_grad():
        _ShapeProp(gm).run(*inputs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__
