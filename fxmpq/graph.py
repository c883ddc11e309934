"""Graph capture with torch.fx, quantizable-layer discovery and typed access to fxmpq's node metadata."""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError
from .hardware import LayerKind

log = logging.getLogger(__name__)

__all__ = [
    "META_KEY",
    "LayerMeta",
    "QuantizableNode",
    "as_input_tuple",
    "find_quantizable_nodes",
    "layer_meta",
    "set_layer_meta",
    "trace",
]

META_KEY = "fxmpq"

CONV_MODULES = (nn.Conv1d, nn.Conv2d)
LINEAR_MODULES = (nn.Linear,)
CONV_FUNCTIONS = (F.conv1d, F.conv2d, torch.conv1d, torch.conv2d)
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)


@dataclass(frozen=True)
class LayerMeta:
    """What fxmpq knows about one quantizable layer; stored as node.meta["fxmpq"] on its call node."""

    name: str
    kind: LayerKind
    macs: int
    params: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int = 1
    pinned: bool = False
    pin_bits: tuple[int, int] | None = None
    input_node: str = ""
    costs: Mapping[tuple[int, int], Mapping[str, float]] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    @property
    def searchable(self) -> bool:
        """Whether the search may choose this layer's bits (pinned layers are fixed)."""
        return not self.pinned


def layer_meta(node: fx.Node) -> LayerMeta | None:
    """The fxmpq metadata of `node`, or None for nodes that are not quantizable layers."""
    value = node.meta.get(META_KEY)
    return value if isinstance(value, LayerMeta) else None


def set_layer_meta(node: fx.Node, meta: LayerMeta) -> None:
    """Attach fxmpq metadata to `node` (the one namespaced key fxmpq writes)."""
    node.meta[META_KEY] = meta


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
    """Capture `model` as an fx.GraphModule with shapes in node.meta; the user's model is not touched.

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
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as e:
        node = getattr(e, "fxmpq_node", None)
        raise TraceError(
            f"running the traced {type(model).__name__} on the example inputs failed"
            f"{' at node ' + node if node else ''}: {type(e).__name__}: {e}. Check that example_inputs have "
            f"the shape and dtype the model expects (got {[_describe(x) for x in inputs]})."
        ) from e
    finally:
        gm.train(was_training)
    return gm


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


@dataclass(frozen=True)
class QuantizableNode:
    """A call node that runs a quantizable layer: its stable name, kind and where its weight lives."""

    node: fx.Node
    name: str
    kind: LayerKind
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    module: nn.Module | None  # the nn.Module for call_module nodes; None for functional calls
    weight_attr: str  # qualname of the weight parameter ("layer1.0.conv1.weight")


def _shape(node: Any) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else ()


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _conv_kind(weight: torch.Tensor, groups: int) -> LayerKind:
    in_per_group = weight.shape[1]
    return LayerKind.DEPTHWISE_CONV if groups > 1 and in_per_group == 1 else LayerKind.CONV


def find_quantizable_nodes(gm: fx.GraphModule) -> list[QuantizableNode]:
    """Every Conv1d/Conv2d/Linear module call and F.conv*/F.linear call with a parameter weight, in graph order.

    A module called more than once yields one entry per call; the second call is named "<qualname>#1", etc.
    A layer whose input does not depend on the model's inputs (e.g. Swin V2's position-bias MLP, which runs on a
    constant coordinate table) is left out: it is a constant a deployed model precomputes, not per-input work.
    """
    found: list[QuantizableNode] = []
    seen: dict[str, int] = {}
    live: set[fx.Node] = set()  # nodes whose value depends on a placeholder (graph order is topological)
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in live for a in node.all_input_nodes):
            live.add(node)
        q = _match(gm, node)
        if q is None:
            continue
        x = input_node(q)
        if x is None or x not in live:
            log.info("layer %s reads no model input (a constant): not quantized", q.name)
            continue
        count = seen.get(q.name, 0)
        seen[q.name] = count + 1
        if count:
            q = QuantizableNode(**{**q.__dict__, "name": f"{q.name}#{count}"})
        found.append(q)
    return found


def _match(gm: fx.GraphModule, node: fx.Node) -> QuantizableNode | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, CONV_MODULES):
            return QuantizableNode(node, node.target, _conv_kind(m.weight, m.groups), m.weight, m.bias,
                                   m.groups, m, f"{node.target}.weight")
        if isinstance(m, LINEAR_MODULES):
            return QuantizableNode(node, node.target, LayerKind.LINEAR, m.weight, m.bias, 1, m,
                                   f"{node.target}.weight")
        return None
    if node.op != "call_function" or node.target not in CONV_FUNCTIONS + LINEAR_FUNCTIONS:
        return None
    args = list(node.args) + [None] * 7
    w_node = node.kwargs.get("weight", args[1])
    if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
        return None
    weight = _get_attr(gm, w_node.target)
    if not isinstance(weight, nn.Parameter):
        return None
    b_node = node.kwargs.get("bias", args[2])
    bias = _get_attr(gm, b_node.target) if isinstance(b_node, fx.Node) and b_node.op == "get_attr" else None
    name = w_node.target[: -len(".weight")] if w_node.target.endswith(".weight") else w_node.target
    if node.target in LINEAR_FUNCTIONS:
        return QuantizableNode(node, name, LayerKind.LINEAR, weight, bias, 1, None, w_node.target)
    groups = node.kwargs.get("groups", args[6] if args[6] is not None else 1)
    if not isinstance(groups, int):
        return None
    return QuantizableNode(node, name, _conv_kind(weight, groups), weight, bias, groups, None, w_node.target)


def layer_macs(q: QuantizableNode) -> int:
    """Multiply-accumulates of one call per sample (batch dimension 0 divided out)."""
    out_shape = _shape(q.node)
    if not out_shape:
        return 0
    per_sample = math.prod(out_shape[1:]) if len(out_shape) > 1 else math.prod(out_shape)
    if q.kind is LayerKind.LINEAR:
        return per_sample * q.weight.shape[1]
    return per_sample * math.prod(q.weight.shape[1:])


def layer_params(q: QuantizableNode) -> int:
    """Parameter count of the layer (weight plus bias)."""
    return q.weight.numel() + (q.bias.numel() if q.bias is not None else 0)


def input_node(q: QuantizableNode) -> fx.Node | None:
    """The fx node whose value is the layer's input activation."""
    x = q.node.args[0] if q.node.args else q.node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


def node_shapes(q: QuantizableNode) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, output shape) of the layer as propagated on the example inputs."""
    x = input_node(q)
    return (_shape(x) if x is not None else ()), _shape(q.node)


def quantizable_layers(gm: fx.GraphModule) -> Iterable[tuple[fx.Node, LayerMeta]]:
    """(node, metadata) of every annotated layer in graph order."""
    for node in gm.graph.nodes:
        meta = layer_meta(node)
        if meta is not None:
            yield node, meta
