"""A torch.fx tracer that specializes on the example inputs' shapes, for models whose Python code branches on them.

torch.fx's symbolic tracing cannot run `if h != w`, `int(math.ceil(h / p))` or `x.dtype != expected`: every
tensor is a Proxy, so its shape and dtype are too. Models from timm and Hugging Face do this all the time, though
none of it depends on the data. `ShapeTracer` runs the model twice alongside the trace, on the example inputs
re-batched to two batch sizes (2 and 3 rows, cycling the example's rows), and answers every shape, dtype and
device query with a concrete value when both runs agree: a size that differs between them follows the batch and
stays symbolic in the graph (a `size` node), so the captured graph runs at any batch size. Control flow on tensor
values, or on a batch-dependent size, still fails, with torch.fx's error. Layer names stay module qualnames, as
with plain symbolic tracing; `fxmpq.trace` uses this tracer only when plain tracing fails (`gm.meta["capture"]`).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from ..core.dead_code import eliminate_dead_code

__all__ = ["BATCHES", "ShapeTracer", "batch_variants", "fold_rank_checks", "substitute_constants"]

BATCHES = (2, 3)  # the two batch sizes the model runs at while tracing: a size that differs follows the batch

# tensor attributes and methods answered from the real values (equal in both runs: a constant of the graph)
_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta",
                    "is_nested", "requires_grad"})
_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
                      "element_size", "get_device", "is_contiguous", "stride"})


# methods of a real tensor that may be handed a traced size (`self.rel_indices.expand(B, -1, -1, -1)` in timm's
# ConViT, B the symbolic batch): recorded as call_method nodes on the tensor (a constant of the graph) while tracing
_SIZED_METHODS = ("expand", "view", "reshape", "repeat", "new_zeros", "new_ones", "new_full", "new_empty")


@contextlib.contextmanager
def _sized_methods_traced() -> Iterator[None]:
    """torch.fx's wrapped-method table extended by _SIZED_METHODS for the duration of one trace."""
    table = fx._symbolic_trace._wrapped_methods_to_patch
    added = [(torch.Tensor, m) for m in _SIZED_METHODS if (torch.Tensor, m) not in table]
    table.extend(added)
    try:
        yield
    finally:
        for item in added:
            table.remove(item)


def batch_variants(inputs: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The example inputs at each batch size of BATCHES: every tensor's rows cycled (its dim 0)."""
    out = []
    for n in BATCHES:
        out.append(tuple(x[torch.arange(n) % x.shape[0]] if isinstance(x, torch.Tensor) and x.dim() > 0
                         and x.shape[0] > 0 else x for x in inputs))
    return out


class _ShapeQueries:
    """Shape, dtype and device queries answered from the values a node has in the two runs (see the module)."""

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") or k in ("node", "tracer", "root", "attr"):
            raise AttributeError(k)
        if k in _ATTRS or k in _METHODS:
            vals = self.tracer.values.get(self.node)
            if vals is not None and isinstance(vals[0], torch.Tensor):
                if k == "shape":
                    return self.tracer.shape_of(self)
                if k in _METHODS:
                    return self.tracer.method_of(self, k)
                a, b = (getattr(v, k) for v in vals)
                if a == b:
                    return a
        return _Attribute(self, k)

    def __len__(self) -> int:
        a, b = (len(v) for v in self.tracer.values[self.node])
        if a != b:
            raise fx.proxy.TraceError(f"len() of {self.node.name} follows the batch size ({a} and {b} rows); it "
                                      f"cannot be a constant of the graph")
        return a

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])


class _Proxy(_ShapeQueries, fx.Proxy):
    def __setitem__(self, key: Any, value: Any) -> None:
        """`t[idx] = v` (Swin builds its shift mask so): an operator.setitem node, run on both values too."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _Attribute(_ShapeQueries, fx.proxy.Attribute):
    """`proxy.attr`: a method call when called (call_method), else a getattr node whose value is known."""


class ShapeTracer(fx.Tracer):
    """torch.fx tracing that runs the model alongside on the example inputs at two batch sizes (see the module)."""

    def __init__(self, inputs: Sequence[Any]):
        super().__init__()
        self.variants = batch_variants(inputs)
        self.n_inputs = len(inputs)
        self.values: dict[fx.Node, tuple[Any, Any]] = {}
        self._placeholders = 0
        self._running = 0  # > 0 while a node's value is computed (the model runs for real, untraced)

    # ------------------------------------------------------------------ tracing hooks
    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace `root` (a module) called on the example inputs alone: its other parameters at their defaults."""
        if concrete_args:
            raise fx.proxy.TraceError("ShapeTracer takes the example inputs, not concrete_args")
        with torch.no_grad(), _sized_methods_traced():
            return super().trace(root)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
                             ) -> tuple[Callable[..., Any], list[Any]]:
        """One placeholder per example input, named by the forward's parameters; the function torch.fx calls is the
        undecorated forward (Hugging Face wraps it in `*args, **kwargs` decorators), the rest at their defaults."""
        raw = inspect.unwrap(root_fn)
        params = list(inspect.signature(raw).parameters.values())[1:]  # after self
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(names) < self.n_inputs:
            raise fx.proxy.TraceError(f"{type(self.root).__name__}.forward takes {len(names)} positional "
                                      f"input(s), {self.n_inputs} example input(s) given")
        holders = [self.create_proxy("placeholder", n, (), {}) for n in names[:self.n_inputs]]

        def call(root: nn.Module, *xs: Any) -> Any:
            return raw(root, *xs)

        return call, [self.root, *holders]

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._running:  # computing a value: the real module, not a trace of it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._running:  # computing a value: the parameter itself
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":
            i = self._placeholders
            self._placeholders += 1
            if i < self.n_inputs:
                self.values[proxy.node] = (self.variants[0][i], self.variants[1][i])
            else:  # a parameter fixed at its default (concrete_args): torch.fx checks it is that value
                default = proxy.node.args[0] if proxy.node.args else None
                self.values[proxy.node] = (default, default)
        elif kind != "output":
            self.values[proxy.node] = tuple(self._run(kind, target, args, kwargs, j) for j in (0, 1))
        return proxy

    # ------------------------------------------------------------------ the two runs
    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict, j: int) -> Any:
        def value(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                if a.node not in self.values:
                    raise fx.proxy.TraceError(f"no value for {a.node.format_node()} while specializing shapes")
                return self.values[a.node][j]
            return a

        args = map_aggregate(args, value)
        kwargs = map_aggregate(kwargs, value)
        self._running += 1
        try:
            return self._execute(kind, target, args, kwargs)
        finally:
            self._running -= 1

    def _execute(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        with torch.no_grad():
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self.root.get_submodule(target)(*args, **kwargs)
            if kind == "get_attr":
                obj: Any = self.root
                for part in target.split("."):
                    obj = getattr(obj, part)
                return obj
        raise fx.proxy.TraceError(f"unexpected node kind {kind!r}")

    def shape_of(self, proxy: _Proxy) -> tuple[Any, ...] | torch.Size:
        """`proxy.shape`: torch.Size when both runs agree, else a tuple with a `size(d)` node at each batch dim."""
        a, b = (v.shape for v in self.values[proxy.node])
        if a == b:
            return a
        if len(a) != len(b):
            raise fx.proxy.TraceError(f"{proxy.node.name} has rank {len(a)} at batch {BATCHES[0]} and {len(b)} at "
                                      f"batch {BATCHES[1]}")
        return tuple(x if x == y else proxy.size(d) for d, (x, y) in enumerate(zip(a, b)))

    def method_of(self, proxy: _Proxy, name: str) -> Callable[..., Any]:
        """`proxy.size`, `proxy.dim`, ...: the concrete answer when both runs agree, else a graph node."""
        def call(*args: Any, **kwargs: Any) -> Any:
            a, b = (getattr(v, name)(*args, **kwargs) for v in self.values[proxy.node])
            if a == b:
                return a
            if name == "size" and not args and not kwargs:
                return self.shape_of(proxy)
            return self.create_proxy("call_method", name, (proxy, *args), kwargs)

        return call


# rank and dtype queries a plain symbolic trace leaves in the graph (timm's BatchNormAct2d: `assert x.ndim == 4`)
_RANK_ATTRS = frozenset({"ndim", "dtype"})
_RANK_METHODS = frozenset({"dim", "ndimension"})
_FOLDABLE = frozenset({operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.not_,
                       operator.and_, operator.or_, operator.truth})


def fold_rank_checks(gm: fx.GraphModule) -> int:
    """Replace rank and dtype queries of shape-propagated tensors (and comparisons of them) by their values, and
    drop `torch._assert`s they make true; how many asserts went.

    Such a check reads a layer's output a second time, so the layer no longer looks like the only producer of the
    BatchNorm after it (no folding, no switchable BN). The capture specializes on the example's ranks and dtypes
    anyway; a batch-dependent size is not touched."""
    const: dict[fx.Node, Any] = {}

    def value(a: Any) -> Any:
        return const.get(a, a) if isinstance(a, fx.Node) else a

    def meta(a: Any) -> Any:
        return a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None

    dropped = 0
    for node in list(gm.graph.nodes):
        args = node.args
        if (node.op == "call_function" and node.target is getattr and len(args) == 2 and args[1] in _RANK_ATTRS
                and hasattr(meta(args[0]), "shape")):
            const[node] = len(meta(args[0]).shape) if args[1] == "ndim" else meta(args[0]).dtype
        elif (node.op == "call_method" and node.target in _RANK_METHODS and len(args) == 1 and not node.kwargs
                and hasattr(meta(args[0]), "shape")):
            const[node] = len(meta(args[0]).shape)
        elif (node.op == "call_function" and node.target in _FOLDABLE and not node.kwargs
                and any(a in const for a in args) and all(a in const or not isinstance(a, fx.Node) for a in args)):
            const[node] = node.target(*(value(a) for a in args))
        elif node.op == "call_function" and node.target is torch._assert and args and args[0] in const:
            if const[args[0]] == True:  # noqa: E712 (a numpy/tensor bool compares equal too)
                gm.graph.erase_node(node)
                dropped += 1
    substitute_constants(gm, const)
    return dropped


def substitute_constants(gm: fx.GraphModule, const: dict[fx.Node, Any]) -> None:
    """Every use of a node in `const` reads its constant instead; the nodes left unread go (dead-code elimination)."""
    if not const:
        return
    for node in const:
        for user in list(node.users):
            user.args = map_aggregate(user.args, lambda a: const.get(a, a) if isinstance(a, fx.Node) else a)
            user.kwargs = map_aggregate(user.kwargs, lambda a: const.get(a, a) if isinstance(a, fx.Node) else a)
    eliminate_dead_code(gm.graph)
    gm.recompile()
