"""FoldFloatConstantsPass: float subgraphs of the model's own constants computed once, by PyTorch, before export.

A subgraph that reads only parameters and buffers (swin_v2's relative-position bias, 16 * sigmoid(cpb_mlp(table)),
and its logit scale, exp(clamp(p))) is computed by the QuantModel on every call with PyTorch's kernels; exported as
it is, ONNX Runtime folds it at session creation with its own, whose exp, sigmoid and matmul differ in the last
bits, and every attention logit built from it differs with them (swin_v2_t: 40 % of the softmax inputs, most of its
flipped values). Folded here, the file carries PyTorch's values as initializers, and both libraries then apply them
with single IEEE-754 operations. Quantize-dequantize and integer-weight ops are never folded (the export keeps
them as Q/DQ), nor data movement of a parameter alone (a transposed weight would be stored twice); results of
more than `max_elements` values stay in the graph.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmpq.core.dead_code import eliminate_dead_code
from fxmpq.quant.float_ops import float_op_nodes

from .lower_qdq import LOWERED
from .qdq_ops import DQ_OP, NBITS_OP, QDQ_CHANNELS_OP, QDQ_OP

log = logging.getLogger(__name__)

__all__ = ["FoldFloatConstantsPass"]

_KEEP = {DQ_OP, NBITS_OP, QDQ_CHANNELS_OP, QDQ_OP}
_RANDOM = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
           torch.bernoulli, torch.multinomial, torch.normal}


class FoldFloatConstantsPass(PassBase):
    """Replace each maximal constant float subgraph that a non-constant node reads by a buffer holding its value;
    modified when any was."""

    def __init__(self, max_elements: int = 1 << 20) -> None:
        super().__init__()
        self.max_elements = max_elements

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        g = gm.graph
        const: set[fx.Node] = set()
        for n in g.nodes:
            if n.op == "get_attr":
                const.add(n)
            elif (n.op in ("call_function", "call_method", "call_module") and n.target not in _KEEP
                  and n.target not in _RANDOM and n.all_input_nodes and all(a in const for a in n.all_input_nodes)):
                const.add(n)
        floats = set(float_op_nodes(gm)) & const
        if not floats:
            return PassResult(gm, False)
        # a frontier node (constant, read by a non-constant one) is folded when a float op lies in its subgraph
        frontier = [n for n in g.nodes if n in const and n.op != "get_attr"
                    and any(u not in const for u in n.users)]
        interp = fx.Interpreter(gm)  # evaluates constant nodes one by one, each once (its env caches them)

        def value(n: fx.Node) -> Any:
            if n not in interp.env:
                for a in n.all_input_nodes:
                    value(a)
                interp.env[n] = interp.run_node(n)
            return interp.env[n]

        def has_float(n: fx.Node, seen: set[fx.Node]) -> bool:
            if n in seen:
                return False
            seen.add(n)
            return n in floats or any(has_float(a, seen) for a in n.all_input_nodes)

        if not hasattr(gm, LOWERED):
            gm.add_module(LOWERED, torch.nn.Module())
        holder = gm.get_submodule(LOWERED)
        folded = 0
        was = gm.training
        gm.eval()
        try:
            for n in frontier:
                if not has_float(n, set()):
                    continue
                with torch.no_grad():
                    v = value(n)
                if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                    continue
                if v.numel() > self.max_elements:  # the file would store it: ONNX Runtime folds it instead
                    log.info("constant %s (%d values) left to ONNX Runtime to fold", n.name, v.numel())
                    continue
                name = f"folded_{n.name}"
                holder.register_buffer(name, v.detach().clone().contiguous())
                with g.inserting_before(n):
                    attr = g.get_attr(f"{LOWERED}.{name}")
                attr.meta.update({k: m for k, m in n.meta.items() if k == "tensor_meta"})
                for u in [u for u in n.users if u not in const]:
                    u.replace_input_with(n, attr)
                folded += 1
        finally:
            gm.train(was)
        if not folded:
            return PassResult(gm, False)
        eliminate_dead_code(g)
        gm.delete_all_unused_submodules()
        gm.recompile()
        log.info("folded %d constant float subgraphs into buffers (computed by PyTorch)", folded)
        return PassResult(gm, True)

