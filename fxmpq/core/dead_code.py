"""Dead-code elimination that keeps in-place ops: torch.fx's own treats `out.mul_(g)` with an unused result as dead
(pytorch/pytorch#68301) and drops it, silently changing what a model computes (timm's NormFreeBlock scales its
residual so)."""

from __future__ import annotations

import operator

import torch.fx as fx

__all__ = ["eliminate_dead_code", "is_in_place"]

_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                 operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                 operator.setitem})


def is_in_place(node: fx.Node) -> bool:
    """Whether `node` mutates one of its inputs: a `x.op_()` method, an in-place operator, or an aten `op_`."""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    return False


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """torch.fx's dead-code elimination, with in-place ops counted as side effects; whether anything went."""
    return graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_in_place(n))
