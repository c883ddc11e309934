"""Attention as layers: what the capture does so that attention's projections and products are quantizable.

Three spellings hide them from a plain trace, and each is opened here:
- `nn.MultiheadAttention` is a torch.nn module, so torch.fx keeps it as one opaque call. `mha_forward` computes
  self-attention (query, key and value one tensor, no masks or extra biases: what ViTs run) in traceable ops on
  the module's own parameters: `F.linear` on `in_proj_weight` (layer `<module>.in_proj`), two matmuls, and the
  module's `out_proj` Linear. Anything else keeps the opaque call.
- torchvision's Swin computes attention inside `shifted_window_attention`, which it registers with `torch.fx.wrap`
  (a leaf function). `traced_through()` lifts that registration while tracing, so its `F.linear` calls on
  `qkv.weight`/`proj.weight` and its matmuls land in the graph (its shape arithmetic then needs the
  shape-specializing tracer, which `fxmpq.trace` falls back to).
- `F.scaled_dot_product_attention` (timm, Hugging Face's sdpa attention, fxmpq.models.vit) is one fused call;
  `decompose_sdpa` rewrites it into softmax(q @ k^T * scale + mask) @ v, what the ONNX export emits anyway.
- `torch.einsum` of two tensors that is a batched matrix product (torchvision's MaxViT: "BGHID,BGHJD->BGHIJ") is
  one call the matcher cannot read; `decompose_einsum` rewrites it into permute, matmul, permute.
The matmuls then become MATMUL layers (fxmpq.capture.matcher), their two operands quantized.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx import _symbolic_trace

__all__ = ["TRACED_THROUGH", "EinsumMatmul", "decompose_einsum", "decompose_sdpa", "einsum_as_matmul", "mha_forward",
           "mha_supported", "traced_through"]

# functions libraries register with torch.fx.wrap that hold attention's layers: traced through by fxmpq.trace
TRACED_THROUGH = ("shifted_window_attention",)


@contextlib.contextmanager
def traced_through(names: tuple[str, ...] = TRACED_THROUGH) -> Iterator[None]:
    """While active, the torch.fx.wrap registrations of the functions `names` are lifted (torch.fx traces into
    them); restored on exit."""
    table = _symbolic_trace._wrapped_fns_to_patch
    lifted = {k: v for k, v in table.items() if k[1] in names}
    for k in lifted:
        del table[k]
    try:
        yield
    finally:
        table.update(lifted)


def mha_supported(m: nn.MultiheadAttention, query: Any, key: Any = None, value: Any = None,
                  key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
                  average_attn_weights: bool = True, is_causal: bool = False) -> bool:
    """Whether `m(query, key, value, ...)` is the plain self-attention `mha_forward` computes."""
    return (query is key and key is value and key_padding_mask is None and attn_mask is None and not is_causal
            and m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None and not m.add_zero_attn)


def mha_forward(m: nn.MultiheadAttention, query: Any, key: Any, value: Any, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Any:
    """`m(query, key, value, ...)` as traceable ops, for plain self-attention (`mha_supported`). Same values as
    nn.MultiheadAttention (its weights averaged over heads when `need_weights`)."""
    x = query if m.batch_first else query.transpose(0, 1)  # [B, T, E]
    heads, dim = m.num_heads, m.head_dim
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).unflatten(-1, (3, heads, dim)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, T, D]
    attn = torch.matmul(q * (1.0 / math.sqrt(dim)), k.transpose(-2, -1)).softmax(-1)
    weights = attn
    if m.dropout > 0.0:
        attn = F.dropout(attn, p=m.dropout, training=m.training)
    y = m.out_proj(torch.matmul(attn, v).transpose(1, 2).flatten(2))
    if not m.batch_first:
        y = y.transpose(0, 1)
    if not need_weights:
        return y, None
    return y, (weights.mean(1) if average_attn_weights else weights)


_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)  # timm calls the C one
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _replace(g: fx.Graph, node: fx.Node, new: set[fx.Node], out: fx.Node) -> None:
    """Replace `node` by `out`, computed by the `new` nodes, which take its module stack: the matmuls among them
    are named after the module that called the attention."""
    for n in new:
        n.meta.update({key: val for key, val in node.meta.items() if key in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(out)
    g.erase_node(node)


def decompose_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite every F.scaled_dot_product_attention call into softmax(q @ k^T * scale + mask) @ v (dropout
    kept); how many. Needs shapes in node.meta (the scale defaults to 1/sqrt of q's last size). Calls with
    grouped-query attention, or shapes not known, stay as they are."""
    g = gm.graph
    done = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        a = {**dict(zip(_SDPA_ARGS, node.args)), **node.kwargs}
        q, k, v = a["query"], a["key"], a["value"]
        mask, p, causal, scale = a.get("attn_mask"), a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale")
        tq, tk = (n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None for n in (q, k))
        if a.get("enable_gqa") or tq is None or tk is None or isinstance(causal, fx.Node) or isinstance(p, fx.Node):
            continue
        if scale is None:
            scale = 1.0 / math.sqrt(tq.shape[-1])
        before = set(g.nodes)
        with g.inserting_before(node):
            kt = g.call_method("transpose", (k, -2, -1))
            s = g.call_function(torch.matmul, (q, kt))
            s = g.call_function(torch.mul, (s, scale))
            if causal:
                lq, lk = tq.shape[-2], tk.shape[-2]
                keep = g.call_function(torch.ones, ((lq, lk),), {"dtype": torch.bool})
                keep = g.call_function(torch.tril, (keep,))
                s = g.call_method("masked_fill", (s, g.call_function(torch.logical_not, (keep,)), float("-inf")))
            if isinstance(mask, fx.Node):
                tm = mask.meta.get("tensor_meta")
                if tm is not None and tm.dtype == torch.bool:
                    s = g.call_method("masked_fill", (s, g.call_function(torch.logical_not, (mask,)), float("-inf")))
                else:
                    s = g.call_function(torch.add, (s, mask))
            attn = g.call_function(torch.softmax, (s, -1))
            if p:
                attn = g.call_function(F.dropout, (attn,), {"p": float(p), "training": True})
            out = g.call_function(torch.matmul, (attn, v))
        _replace(g, node, set(g.nodes) - before, out)
        done += 1
    if done:
        gm.recompile()
    return done


@dataclass(frozen=True)
class EinsumMatmul:
    """A two-operand einsum as a batched matmul: `a` permuted by `perm_a` is (batch..., m..., k...), `b` permuted by
    `perm_b` is (batch..., k..., n...); the m, k and n groups are flattened to one dimension each, multiplied, the
    m and n groups unflattened to `m_sizes`, `n_sizes`, and the product (batch..., m..., n...) permuted by
    `perm_out` is the einsum's output."""

    perm_a: tuple[int, ...]
    perm_b: tuple[int, ...]
    perm_out: tuple[int, ...]
    batch: int
    m_sizes: tuple[int, ...]
    k: int
    n_sizes: tuple[int, ...]


def einsum_as_matmul(equation: str, shape_a: Sequence[int], shape_b: Sequence[int]) -> EinsumMatmul | None:
    """How a two-operand einsum with operands of these shapes is a batched matmul, or None when it is not one
    (every letter in both operands and the output: batch; in one operand and the output: m or n; in both
    operands only: contracted; at least one of each of the last three, no letter twice in one term, a "..."
    only leading in all three terms, and an operand's first dimension not in an m or n group of several)."""
    eq = equation.replace(" ", "")
    if eq.count("->") != 1:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if "..." in eq:  # leading in all three: as many batch letters as `a` has dimensions beyond its letters
        if not all(t.startswith("...") and t.count("...") == 1 for t in (a, b, out)):
            return None
        extra = len(shape_a) - (len(a) - 3)
        if extra < 0 or extra != len(shape_b) - (len(b) - 3):
            return None
        free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq][:extra]
        a, b, out = ("".join(free) + t[3:] for t in (a, b, out))
    if (len(a), len(b)) != (len(shape_a), len(shape_b)) or any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    batch = [c for c in out if c in a and c in b]
    m = [c for c in a if c not in b and c in out]
    n = [c for c in b if c not in a and c in out]
    k = [c for c in a if c in b and c not in out]
    if not (m and n and k) or set(a) != {*batch, *m, *k} or set(b) != {*batch, *k, *n} or set(out) != {*batch, *m, *n}:
        return None
    if (len(m) > 1 and a[0] in m) or (len(n) > 1 and b[0] in n):
        return None  # unflattening would fix an operand's first dimension (the batch) at the example's size
    prod = batch + m + n
    return EinsumMatmul(tuple(a.index(c) for c in batch + m + k), tuple(b.index(c) for c in batch + k + n),
                        tuple(prod.index(c) for c in out), len(batch), tuple(shape_a[a.index(c)] for c in m), len(k),
                        tuple(shape_b[b.index(c)] for c in n))


def decompose_einsum(gm: fx.GraphModule) -> int:
    """Rewrite every torch.einsum of two computed tensors that is a batched matmul (`einsum_as_matmul`) into
    permute, flatten, torch.matmul, unflatten, permute (the identities left out); how many. Needs shapes in
    node.meta."""
    g = gm.graph
    done = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not torch.einsum or not node.args \
                or not isinstance(node.args[0], str) or node.kwargs:
            continue
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], list | tuple):
            ops = tuple(ops[0])
        metas = [o.meta.get("tensor_meta") if isinstance(o, fx.Node) else None for o in ops]
        if len(ops) != 2 or any(m is None or not hasattr(m, "shape") for m in metas) \
                or any(o.op == "get_attr" for o in ops):  # a parameter operand is a weight, not a matmul layer
            continue
        em = einsum_as_matmul(node.args[0], tuple(metas[0].shape), tuple(metas[1].shape))
        if em is None:
            continue
        before = set(g.nodes)
        nb, nm, nn_ = em.batch, len(em.m_sizes), len(em.n_sizes)

        def call(method: str, x: fx.Node, *args: Any) -> fx.Node:
            return g.call_method(method, (x, *args))

        with g.inserting_before(node):
            x, y = ops
            if list(em.perm_a) != sorted(em.perm_a):
                x = call("permute", x, *em.perm_a)
            if nm > 1:
                x = call("flatten", x, nb, nb + nm - 1)
            if em.k > 1:
                x = call("flatten", x, nb + 1, nb + em.k)
            if list(em.perm_b) != sorted(em.perm_b):
                y = call("permute", y, *em.perm_b)
            if em.k > 1:
                y = call("flatten", y, nb, nb + em.k - 1)
            if nn_ > 1:
                y = call("flatten", y, nb + 1, nb + nn_)
            out = g.call_function(torch.matmul, (x, y))
            if nn_ > 1:
                out = call("unflatten", out, -1, em.n_sizes)
            if nm > 1:
                out = call("unflatten", out, nb, em.m_sizes)
            if list(em.perm_out) != sorted(em.perm_out):
                out = call("permute", out, *em.perm_out)
        _replace(g, node, set(g.nodes) - before, out)
        done += 1
    if done:
        gm.recompile()
    return done
