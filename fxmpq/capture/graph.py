"""Capture: trace a model with torch.fx, propagate the example inputs' shapes, and record its quantizable layers."""

from __future__ import annotations

import copy
import functools
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

from ..core.dead_code import eliminate_dead_code
from ..core.primitives import FakeQuantizer
from ..errors import ArgumentError, TraceError, first_line
from .attention import decompose_einsum, decompose_sdpa, mha_forward, mha_supported, traced_through
from .matcher import find_layers
from .tracer import ShapeTracer, fold_rank_checks, substitute_constants

log = logging.getLogger(__name__)

__all__ = ["NodeFailure", "as_input_tuple", "constant_value", "input_hint", "propagate_shapes", "refuse_quantized",
           "run_graph", "select_output", "trace"]


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise `example_inputs` (a tensor or a sequence of positional inputs) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of positional inputs, found {type(example_inputs).__name__}"
    )


class _LeafStack:
    """Keeps user-named leaf modules opaque and remembers which module the trace is in."""

    def _set_leaves(self, leaf_modules: Sequence[str | type[nn.Module]]) -> None:
        self.leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self.stack: list[tuple[str, str]] = []

    def _user_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_names or bool(self.leaf_types and isinstance(m, self.leaf_types))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._user_leaf(m, module_qualified_name):
            return True
        if m is getattr(self, "_opened", None):  # an nn.MultiheadAttention traced through (fxmpq.capture.attention)
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if getattr(self, "_running", 0):  # ShapeTracer computing a value: not part of the trace
            return super().call_module(m, forward, args, kwargs)
        qualname = self.path_of_module(m)
        self.stack.append((qualname, type(m).__name__))
        opened = getattr(self, "_opened", None)
        if (isinstance(m, nn.MultiheadAttention) and not self._user_leaf(m, qualname)
                and mha_supported(m, *args, **kwargs)):
            self._opened, forward = m, functools.partial(mha_forward, m)
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._opened = opened
        self.stack.pop()  # kept on failure: the error names the module it happened in
        return out


class _Tracer(_LeafStack, fx.Tracer):
    """Plain torch.fx symbolic tracing."""

    def __init__(self, leaf_modules: Sequence[str | type[nn.Module]] = ()):
        super().__init__()
        self._set_leaves(leaf_modules)


class _ShapeTracer(_LeafStack, ShapeTracer):
    """Tracing that specializes on the example inputs' shapes (fxmpq.capture.tracer)."""

    def __init__(self, inputs: Sequence[Any], leaf_modules: Sequence[str | type[nn.Module]] = ()):
        super().__init__(inputs)
        self._set_leaves(leaf_modules)


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
    output: str | int | None = None,
) -> fx.GraphModule:
    """Capture `model` as an fx.GraphModule with shapes in node.meta and a LayerRecord on every quantizable layer.

    Plain torch.fx symbolic tracing first; when it fails (Python code branching on shapes or dtypes, as in timm and
    Hugging Face models), tracing that specializes on the example inputs' shapes, the batch size kept symbolic
    (fxmpq.capture.tracer); `gm.meta["capture"]` says which ("symbolic" or "specialized"). A model returning a dict, a
    dataclass (Hugging Face's ModelOutput) or a tuple has its output narrowed to one tensor (`select_output`:
    `output` names the key or index; by default `logits`, or the only tensor). The user's model is not touched.
    The model is deep-copied first, so tracing and shape propagation (run in eval mode without gradients)
    change neither its parameters nor its BatchNorm statistics. Modules named in `leaf_modules` (qualnames or
    types) are kept as one opaque call; their layers are then not quantized.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module to trace, found {type(model).__name__}")
    refuse_quantized(model, "trace")
    inputs = as_input_tuple(example_inputs)
    _check_runnable(model, inputs)
    model = copy.deepcopy(model)
    tracer: _LeafStack = _Tracer(leaf_modules)
    capture = "symbolic"
    try:
        with traced_through():
            graph = tracer.trace(model)
    except Exception as plain:  # torch.fx raises many types; plain tracing failed: specialize on the shapes
        log.info("plain torch.fx tracing of %s failed (%s: %s); tracing with the example inputs' shapes",
                 type(model).__name__, type(plain).__name__, first_line(plain))
        model = copy.deepcopy(model)  # the failed trace may have left state behind
        was_training = model.training
        model.eval()  # the tracer runs the model alongside: BatchNorm statistics stay untouched
        tracer = _ShapeTracer(inputs, leaf_modules)
        capture = "specialized"
        try:
            with traced_through():
                graph = tracer.trace(model)
        except Exception as e:  # each becomes a TraceError naming where
            raise _trace_error(model, tracer, e) from e
        finally:
            model.train(was_training)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["capture"] = capture
    select_output(gm, output)
    bind_defaults(gm, len(inputs))
    module_batch_norms(gm, tracer.root)
    _propagate(gm, inputs, model)
    fold_rank_checks(gm)
    if decompose_sdpa(gm) + decompose_einsum(gm):  # attention's matmuls as layers; their shapes too
        _propagate(gm, inputs, model)
    find_layers(gm)
    return gm


def bind_defaults(gm: fx.GraphModule, n_inputs: int) -> int:
    """Inputs after the first `n_inputs` (the example inputs) become the constants they default to; how many.

    timm's VisionTransformer.forward(x, attn_mask=None, is_causal=False) traces into three placeholders; the model
    is captured as called on the example inputs, so the others are their defaults (and the attention they steer can
    be decomposed). A placeholder without a default stays."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"][n_inputs:]
    const = {n: n.args[0] for n in holders if n.args and isinstance(n.args[0], type(None) | bool | int | float | str)}
    substitute_constants(gm, const)
    for node in const:  # placeholders are not dead code to torch.fx
        gm.graph.erase_node(node)
    if const:
        gm.recompile()
    return len(const)


def _propagate(gm: fx.GraphModule, inputs: Sequence[Any], model: nn.Module) -> None:
    """Shape propagation in eval mode (BatchNorm statistics untouched); TraceError naming the failing node."""
    was_training = gm.training
    gm.eval()
    try:
        propagate_shapes(gm, inputs)
    except NodeFailure as f:
        raise TraceError(f"running the traced {type(model).__name__} on the example inputs failed at "
                         f"{f.describe()}. {input_hint(model, inputs)}") from f.__cause__
    finally:
        gm.train(was_training)


def constant_value(gm: fx.GraphModule, node: Any, what: str) -> torch.Tensor:
    """The value of `node` when it depends on parameters and constants only (no graph input): evaluated once, in
    eval mode. TraceError naming `what` when it reads an input."""
    memo: dict[fx.Node, Any] = {}

    def value(n: Any) -> Any:
        if not isinstance(n, fx.Node):
            return n
        if n in memo:
            return memo[n]
        if n.op == "placeholder":
            raise TraceError(f"{what} is computed from the model's input ({n.name}), not a constant of the model")
        args = fx.node.map_aggregate(n.args, value)
        kwargs = fx.node.map_aggregate(n.kwargs, value)
        if n.op == "get_attr":
            out = functools.reduce(getattr, n.target.split("."), gm)
        elif n.op == "call_function":
            out = n.target(*args, **kwargs)
        elif n.op == "call_method":
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            out = gm.get_submodule(n.target)(*args, **kwargs)
        else:
            raise TraceError(f"{what}: cannot evaluate node {n.format_node()}")
        memo[n] = out
        return out

    with torch.no_grad():
        out = value(node)
    if not isinstance(out, torch.Tensor):
        raise TraceError(f"{what} is not a tensor ({type(out).__name__})")
    return out.detach()


def _trace_error(model: nn.Module, tracer: _LeafStack, e: BaseException) -> TraceError:
    where = ""
    if tracer.stack:
        qual, typ = tracer.stack[-1]
        where = f" in module '{qual or '<root>'}' ({typ})"
    frame = _user_frame(e)
    hint_target = f"'{tracer.stack[-1][0]}'" if tracer.stack and tracer.stack[-1][0] else "<SubmoduleName>"
    return TraceError(
        f"torch.fx cannot trace {type(model).__name__}{where}"
        f"{' at ' + frame if frame else ''}: {type(e).__name__}: {first_line(e)}. "
        f"Mark the offending submodule a leaf so it is kept as one opaque call (its layers are then not "
        f"quantized): fxmpq.trace(model, inputs, leaf_modules=[{hint_target}]), or make the code traceable "
        f"(no Python control flow on tensor values)."
    )


def select_output(gm: fx.GraphModule, output: str | int | None = None) -> None:
    """Narrow a graph that returns a dict, dataclass or tuple to the one tensor a classifier's loss reads: key or
    index `output`, else `logits`, else the only node among the outputs; TraceError naming the fields otherwise."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, fx.Node) and output is None:
        return
    if isinstance(value, dict):
        fields = {str(k): v for k, v in value.items()}
    elif isinstance(value, list | tuple):
        fields = {str(i): v for i, v in enumerate(value)}
    elif output is not None:
        raise TraceError(f"output={output!r}: the model returns one value, not a dict or tuple")
    else:
        return
    tensors = [k for k, v in fields.items() if isinstance(v, fx.Node)]
    if output is not None:
        key = str(output)
        if key not in fields or not isinstance(fields[key], fx.Node):
            raise TraceError(f"output={output!r}: the model's outputs are {', '.join(fields) or 'empty'} (tensors: "
                             f"{', '.join(tensors) or 'none'})")
    elif "logits" in tensors:
        key = "logits"
    elif len(tensors) == 1:
        key = tensors[0]
    else:
        raise TraceError(f"{type(gm).__name__} returns {type(value).__name__} with outputs "
                         f"{', '.join(fields) or 'none'} (tensors: {', '.join(tensors) or 'none'}): pass "
                         f"output=<key or index> to choose the one the loss reads")
    out.args = (fields[key],)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    gm.meta["output"] = key


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_PLAIN_BN = (nn.BatchNorm3d, nn.BatchNorm2d, nn.BatchNorm1d)


def module_batch_norms(gm: fx.GraphModule, root: nn.Module) -> int:
    """F.batch_norm calls on one BatchNorm module's own statistics and affine parameters become calls of a plain
    nn.BatchNorm at `<module>.batch_norm`, sharing them; how many.

    timm's BatchNormAct2d (an nn.BatchNorm2d subclass that applies its activation in its forward) traces into an
    F.batch_norm, which BN folding and the switchable BatchNorm of the method do not see. After the rewrite it is a
    BN like any other, and its activation, traced as ops after it, stays in the graph. The module's own tensors are
    then None (the graph no longer reads them; they live on in the new child). `root` is the traced model: the
    GraphModule holds only what the graph reads of a module traced through, not the module's class."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.nn.functional.batch_norm:
            continue
        args = {**dict(zip(_BN_ARGS, node.args)), **node.kwargs}
        refs = [args.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
        if not all(isinstance(r, fx.Node) and r.op == "get_attr" for r in refs):
            continue
        owners = {r.target.rpartition(".")[0] for r in refs}
        leaves = [r.target.rpartition(".")[2] for r in refs]
        owner = next(iter(owners))
        orig = root.get_submodule(owner) if len(owners) == 1 and owner else None
        cls = next((c for c in _PLAIN_BN if isinstance(orig, c)), None)
        if cls is None or leaves != ["running_mean", "running_var", "weight", "bias"]:
            continue
        m = gm.get_submodule(owner)
        bn = cls(orig.num_features, eps=float(args.get("eps", orig.eps)), momentum=orig.momentum, affine=True,
                 track_running_stats=True)
        bn.weight, bn.bias = orig.weight, orig.bias
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            bn.register_buffer(b, getattr(orig, b))
        bn.train(orig.training)
        m.add_module("batch_norm", bn)
        for name in ("weight", "bias"):
            if name in m._parameters:
                m.register_parameter(name, None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if name in m._buffers:
                m.register_buffer(name, None)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"{owner}.batch_norm", (args["input"],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for r in refs:
            if not r.users:
                gm.graph.erase_node(r)
        done += 1
    if done:
        gm.recompile()
    return done


def refuse_quantized(model: nn.Module, where: str) -> None:
    """ArgumentError when `model` is already quantized (a QuantModel, or a module holding LSQ quantizers):
    tracing it again would quantize the quantizers."""
    holder = next((n for n, m in model.named_modules() if isinstance(m, FakeQuantizer)), None)
    if holder is None:
        return
    what = f"a {type(model).__name__} that holds fxmpq quantizers (at {holder!r})"
    raise ArgumentError(f"{where}: the model is already quantized: {what}. Pass the FP32 nn.Module instead; "
                        f"to go on with this one, use it as it is (fxmpq.train_indicators, fxmpq.apply_policy, "
                        f"fxmpq.finetune, fxmpq.lower take a QuantModel).")


def _check_runnable(model: nn.Module, inputs: Sequence[Any]) -> None:
    """TraceError before any tracing when the model or the inputs hold no data (the meta device)."""
    meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if meta:
        raise TraceError(f"{type(model).__name__}'s parameters are on the meta device (shapes without data, e.g. "
                         f"{meta[0]!r}): nothing can run on them. Materialise the model first, e.g. "
                         f"model.to_empty(device='cpu') and then model.load_state_dict(weights).")
    bad = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_meta]
    if bad:
        raise TraceError(f"example input {bad[0]} is on the meta device (a shape without data); give real tensors, "
                         f"e.g. torch.randn{tuple(inputs[bad[0]].shape)}")


def input_hint(model: nn.Module, inputs: Sequence[Any]) -> str:
    """What is most likely wrong with `inputs` for `model` (dtype, device), for a message after the model failed."""
    got = [_describe(x) for x in inputs]
    tensors = [(i, x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    p = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    ints = [(i, x) for i, x in tensors if not x.is_floating_point()]
    if ints and p is not None:
        i, x = ints[0]
        return (f"Example input {i} is {x.dtype}: inputs must be floating point like the model's parameters "
                f"({p.dtype}); convert them, e.g. x.float() (images as x.float() / 255 if the model was trained "
                f"so) (got {got}).")
    if p is not None:
        other = [(i, x) for i, x in tensors if x.is_floating_point() and x.dtype != p.dtype]
        if other:
            i, x = other[0]
            return (f"Example input {i} is {x.dtype} but the model's parameters are {p.dtype}: convert the inputs "
                    f"(x.to({p.dtype})) or the model (got {got}).")
        far = [(i, x) for i, x in tensors if x.device != p.device]
        if far:
            i, x = far[0]
            return (f"Example input {i} is on {x.device} but the model's parameters are on {p.device}: move one "
                    f"to the other (got {got}).")
    return f"Check that example_inputs have the shape and dtype the model expects (got {got})."


class NodeFailure(Exception):
    """A node failed while the graph ran node by node; the original exception is the cause. `where` names what a
    user knows: the module (its path and type) the node calls or sits in; None when the node is at the top level."""

    def __init__(self, node: fx.Node, where: str | None = None):
        super().__init__(node.format_node())
        self.node = node
        self.where = where

    def describe(self) -> str:
        """'module stem.0 (Conv2d) (graph node %stem_0 = call_module[...]): RuntimeError: <first line of the cause>',
        or 'node add (%add = call_function[...]): ...' for a node outside any module."""
        e = self.__cause__
        cause = f"{type(e).__name__}: {first_line(e) if e is not None else ''}"
        if self.where is None:
            return f"node {self.node.name} ({self.node.format_node()}): {cause}"
        return f"{self.where} (graph node {self.node.format_node()}): {cause}"


def _module_of(gm: nn.Module, n: fx.Node) -> str | None:
    """'module stem.0 (Conv2d)' for a call_module node; 'relu in module layer1.0 (BasicBlock)' for an operation
    traced inside a module's forward (torch.fx's nn_module_stack); None when neither is known."""
    if n.op == "call_module" and isinstance(n.target, str):
        try:
            return f"module {n.target} ({type(gm.get_submodule(n.target)).__name__})"
        except AttributeError:
            return f"module {n.target}"
    stack = n.meta.get("nn_module_stack") or {}
    if n.op in ("call_function", "call_method") and stack:
        path, kind = list(stack.values())[-1]
        if not path:  # the model itself: a top-level operation
            return None
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        return f"{what} in module {path} ({kind.rsplit('.', 1)[-1]})"
    return None


class _NodeByNode(fx.Interpreter):
    """Runs a graph node by node; a failing node raises NodeFailure naming it (no traceback is printed)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except NodeFailure:
            raise
        except Exception as e:
            raise NodeFailure(n, _module_of(self.module, n)) from e


class _ShapeProp(_NodeByNode):
    """torch.fx's ShapeProp without its printed traceback: a failing node raises NodeFailure naming it."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
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


def run_graph(gm: fx.GraphModule, inputs: Sequence[Any]) -> Any:
    """Run `gm` on `inputs` node by node (same results as gm(*inputs)); NodeFailure naming the failing node.

    For one-off runs on inputs the user gave (a quantizer's initialisation, an export's first pass), where a
    failure must name the node and must not print torch.fx's traceback of the generated code.
    """
    return _NodeByNode(gm).run(*inputs)


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Run `gm` on `inputs` without gradients, recording every node's tensor_meta (shape, dtype)."""
    with torch.no_grad():
        _ShapeProp(gm).run(*inputs)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__
