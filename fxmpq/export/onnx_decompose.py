"""torch.onnx's decomposition step without its re-trace where a lowered graph needs none.

torch.onnx.export traces the model with torch.export, then re-traces the whole program (functionalisation, fake
tensors, symbolic shapes) to decompose the ops its ONNX registry cannot translate: two traces, and the second was
about half of `lower()` on small models (docs/RESULTS.md 3.9). fxmpq's lowered graphs need that for a handful of
ops only: activations a model runs in place (nn.ReLU(inplace=True) in float layers), dropout in eval mode,
adaptive average pooling and a BatchNorm kept after float layers. `skip_needless_decomposition()` rewrites those
as the decomposition would (the out-of-place op where nothing else reads the tensor, nothing, a mean over H and W
or avg_pool2d for an even window, the inference BatchNorm kernel) and hands the program on untraced when every op
left is one the registry translates and none mutates; otherwise torch.onnx's own step runs (on the rewritten
program: each rewrite keeps its values). The parity check of every export stays the guard.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["last_left", "skip_needless_decomposition"]

_LOCK = threading.Lock()
_LAST: dict[str, list[str] | None] = {"left": None}


def last_left() -> list[str] | None:
    """The ops that made the last export in this process run torch.onnx's decomposition ([] where it was skipped;
    None before any export)."""
    return _LAST["left"]


def _inplace_to_functional() -> dict[Any, Any]:
    aten = torch.ops.aten
    return {aten.relu_.default: aten.relu.default, aten.hardswish_.default: aten.hardswish.default,
            aten.hardtanh_.default: aten.hardtanh.default, aten.silu_.default: aten.silu.default,
            aten.hardsigmoid_.default: aten.hardsigmoid.default, aten.leaky_relu_.default: aten.leaky_relu.default,
            aten.elu_.default: aten.elu.default, aten.sigmoid_.default: aten.sigmoid.default,
            aten.tanh_.default: aten.tanh.default}


def _exclusive(node: torch.fx.Node) -> bool:
    """Whether an in-place op on `node`, its only user, changes no tensor anything else reads: `node` is used
    once and is a fresh result, or a view (flatten, reshape) of such a tensor used only by that view. Graph inputs,
    constants and ops without a schema count as shared."""
    if len(node.users) != 1 or node.op != "call_function":
        return False
    if node.target is operator.getitem:  # one output of a multi-output op (the inference BatchNorm above)
        return isinstance(node.args[0], torch.fx.Node) and _exclusive(node.args[0])
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    if not any(r.alias_info is not None for r in schema.returns):
        return True
    base = node.args[0] if node.args else None
    return isinstance(base, torch.fx.Node) and _exclusive(base)


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def rewrite(graph: torch.fx.Graph) -> bool:
    """Rewrite `graph` (an exported program's, in place) so that the ops ONNX translation lacks in fxmpq's lowered
    graphs become ones it has, each as torch's decomposition would. Returns False where a rewrite would not be
    safe (an in-place op on a tensor used elsewhere or on a view): the graph is then left for the decomposition."""
    aten = torch.ops.aten
    functional = _inplace_to_functional()
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in functional:
            src = n.args[0]
            if not isinstance(src, torch.fx.Node) or not _exclusive(src):
                return False
            n.target = functional[n.target]
        elif n.target in (aten.dropout.default, aten.dropout_.default) and len(n.args) >= 3 and n.args[2] is False:
            if any(u.op == "output" for u in n.users):
                return False  # the program's output signature names this node
            n.replace_all_uses_with(n.args[0])  # eval-mode dropout is the identity
            graph.erase_node(n)
        elif n.target == aten.adaptive_avg_pool2d.default and isinstance(n.args[0], torch.fx.Node):
            out = [int(s) for s in n.args[1]]
            if out == [1, 1]:
                n.target, n.args = aten.mean.dim, (n.args[0], [-1, -2], True)  # global average pooling
                continue
            val = n.args[0].meta.get("val")
            size = list(val.shape[-2:]) if val is not None else []
            if len(size) != 2 or not all(isinstance(i, int) and i % o == 0 for i, o in zip(size, out)):
                return False  # an uneven window: the decomposition's index arithmetic
            stride = [i // o for i, o in zip(size, out)]  # as torch's decomposition: an even window is avg_pool2d
            n.target, n.args = aten.avg_pool2d.default, (n.args[0], stride, stride)
        elif n.target == aten.batch_norm.default and len(n.args) >= 8 and n.args[5] is False:
            if any(u.op == "output" for u in n.users) or "val" not in n.meta:
                return False
            _inference_batch_norm(graph, n)
    return True


def _inference_batch_norm(graph: torch.fx.Graph, n: torch.fx.Node) -> None:
    """batch_norm(..., training=False) as its decomposition writes it: the inference kernel's first output."""
    x, weight, bias, mean, var, _, momentum, eps = n.args[:8]
    with graph.inserting_before(n):
        bn = graph.call_function(torch.ops.aten._native_batch_norm_legit_no_training.default,
                                 (x, weight, bias, mean, var, momentum, eps))
        out = graph.call_function(operator.getitem, (bn, 0))
    val = n.meta["val"]
    bn.meta = {**n.meta, "val": (val, val.new_empty((0,)), val.new_empty((0,)))}
    out.meta = dict(n.meta)
    n.replace_all_uses_with(out)
    graph.erase_node(n)


def _assertions() -> set[Any]:
    """Shape checks torch.export leaves in a graph; torch.onnx removes them after its decomposition step."""
    aten = torch.ops.aten
    return {aten.sym_constrain_range_for_size.default, aten._assert_async.default, aten._assert_async.msg,
            aten._assert_scalar.default, aten._assert_tensor_metadata.default}


def _translatable(ep: Any, registry: Any) -> list[str]:
    """The ops of `ep` that stop it going to ONNX untraced: not in the registry (but for shape assertions), or
    mutating."""
    asserts = _assertions()
    return sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function" and n.target not in asserts
                   and (_mutates(n) or not registry.is_registered(n.target))})


@contextlib.contextmanager
def skip_needless_decomposition() -> Iterator[None]:
    """Within the block, torch.onnx.export skips its decomposition re-trace where the rewritten program needs
    none (a no-op where torch.onnx has moved its pieces)."""
    try:
        from torch.onnx._internal.exporter import _fx_passes
    except ImportError:
        yield
        return
    real = getattr(_fx_passes, "decompose_with_registry", None)
    if real is None:
        yield
        return

    def decompose(exported_program: Any, registry: Any) -> Any:
        try:
            safe = rewrite(exported_program.graph)
            left = _translatable(exported_program, registry)
        except Exception as e:  # an unexpected graph: torch.onnx's own step decides
            log.debug("decomposition rewrite skipped: %r", e)
            safe, left = False, ["?"]
        _LAST["left"] = left if safe else left or ["an in-place op on a shared tensor"]
        exported_program.graph_module.recompile()
        if not safe or left:
            log.debug("running torch.onnx's decomposition for %s", _LAST["left"])
            return real(exported_program, registry)
        return exported_program

    with _LOCK:
        _fx_passes.decompose_with_registry = decompose
        try:
            yield
        finally:
            _fx_passes.decompose_with_registry = real
