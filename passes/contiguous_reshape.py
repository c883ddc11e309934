"""ContiguousBeforeReshapePass: a `.contiguous()` between a transpose/permute and the reshape that reads it.

Same values; it only spares torch.export's dynamic-batch decomposition, which lowers such a reshape to a view it
then cannot take ("Cannot view a tensor with shape [s, 197, 12, 64] and strides ...": timm's BEiT, Twins). It is
the last pass of `lower_passes()`, so the graph export translates is the pass list's output.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

log = logging.getLogger(__name__)

__all__ = ["ContiguousBeforeReshapePass"]

_STRIDED = {"transpose", "permute", "swapaxes", torch.transpose, torch.permute, torch.swapaxes}


def _is_reshape(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "reshape")
            or (node.op == "call_function" and node.target is torch.reshape))


class ContiguousBeforeReshapePass(PassBase):
    """Insert `.contiguous()` where a reshape reads a transpose, permute or swapaxes; modified when any was."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        g = graph_module.graph
        done = 0
        for node in list(g.nodes):
            src = node.args[0] if _is_reshape(node) and node.args else None
            if not (isinstance(src, fx.Node) and src.op in ("call_method", "call_function") and src.target in _STRIDED):
                continue
            with g.inserting_before(node):
                c = g.call_method("contiguous", (src,))
            if "tensor_meta" in src.meta:
                c.meta["tensor_meta"] = src.meta["tensor_meta"]
            node.replace_input_with(src, c)
            done += 1
        log.debug("contiguous before %d reshape(s)", done)
        return PassResult(graph_module, done > 0)
