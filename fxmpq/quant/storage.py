"""Weight storage in ONNX: which integer container each layer's weights go in, packing int8 to int4 and back.

`Storage.INT8` keeps every weight in an INT8 initializer (what ONNX Runtime's CPU provider fuses into QLinearConv);
`Storage.PACKED` stores weights of at most 4 bits in 4-bit initializers (INT4, or UINT4 for a non-negative range;
opset 21's DequantizeLinear reads both; 2- and 3-bit values go in the 4-bit container, ORT has no INT2), so the file
size follows the policy. `widen` turns 4-bit weight initializers back into 8-bit ones with the same integers, which
ORT fuses again (`fxmpq.ort_session`). Packing and unpacking go through onnx.numpy_helper (ml_dtypes' int4).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..capture.record import Lowered
from ..errors import ArgumentError, ExportError, brief

__all__ = ["NBITS_BLOCK", "Container", "Storage", "as_storage", "initializer_bytes", "pack_nbits", "pack_weights",
           "stored_weight_bytes", "unpack_nbits", "weight_container", "widen"]

NBITS_BLOCK = 32  # MatMulNBits block_size: a power of two >= 16; K is padded up to a multiple of it

_DQ = "DequantizeLinear"


class Storage(enum.StrEnum):
    """How lower() stores quantized weights in the ONNX file."""

    INT8 = "int8"  # 8-bit containers whatever the bit-width (ORT fuses them into integer kernels)
    PACKED = "packed"  # <= 4-bit weights in 4-bit containers (the file follows the policy's size)


class Container(enum.StrEnum):
    """The ONNX integer type a layer's weight initializer is stored as."""

    INT8 = "int8"
    INT4 = "int4"
    UINT4 = "uint4"

    @property
    def bits(self) -> int:
        """Bits per value in the file."""
        return 8 if self is Container.INT8 else 4

    @property
    def onnx_type(self) -> int:
        """The TensorProto data type."""
        from onnx import TensorProto

        return {Container.INT8: TensorProto.INT8, Container.INT4: TensorProto.INT4,
                Container.UINT4: TensorProto.UINT4}[self]


def as_storage(value: Any, where: str) -> Storage:
    """`value` as a Storage; ArgumentError naming `where` and the choices otherwise (checked before any export)."""
    try:
        return Storage(value)
    except ValueError:
        choices = ", ".join(repr(s.value) for s in Storage)
        raise ArgumentError(f"{where} must be one of {choices}, found {brief(value)}") from None


def weight_container(bits: int, qrange: tuple[int, int], storage: Storage) -> Container:
    """The container of a `bits`-bit weight with integer range `qrange`: 4-bit (signed unless the range is
    non-negative) for at most 4 bits under packed storage, else INT8."""
    if storage is Storage.PACKED and bits <= 4:
        return Container.UINT4 if qrange[0] >= 0 else Container.INT4
    return Container.INT8


def _range(container: Container) -> tuple[int, int]:
    return {Container.INT8: (-128, 127), Container.INT4: (-8, 7), Container.UINT4: (0, 15)}[container]


def _consumers(graph: Any) -> dict[str, list[tuple[Any, int]]]:
    """Tensor name -> (node, input index) of every node of `graph` reading it."""
    out: dict[str, list[tuple[Any, int]]] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            out.setdefault(name, []).append((n, i))
    return out


def _retype(graph: Any, types: dict[str, int]) -> None:
    """Give the value infos (graph inputs, outputs, value_info) of the tensors in `types` their new element type."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.name in types and v.type.HasField("tensor_type"):
            v.type.tensor_type.elem_type = types[v.name]


def _convert(tensor: Any, onnx_type: int) -> Any:
    """`tensor` (an initializer) with the same integers stored as `onnx_type`, through onnx.numpy_helper."""
    from onnx import helper, numpy_helper

    values = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(onnx_type)), tensor.name)


def pack_weights(model: Any, layers: Sequence[tuple[str, Lowered]], storage: Storage) -> dict[str, Container]:
    """Store each quantized layer's weight initializer of `model` (a ModelProto, edited in place) in its container;
    returns layer -> container. ExportError naming the layer when its weight is not an INT8 initializer read only by
    DequantizeLinear, or holds integers outside the container."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = _consumers(graph)
    out: dict[str, Container] = {}
    types: dict[str, int] = {}
    for name, low in layers:
        if low.w_bits is None or low.qrange is None or low.matmul_nbits:  # MatMulNBits: packed by the lowering
            continue
        c = out[name] = weight_container(low.w_bits, low.qrange, storage)
        if c is Container.INT8:
            continue
        buf = low.weight_buffer
        t = inits.get(buf or "")
        if t is None or t.data_type != TensorProto.INT8:
            raise ExportError(f"layer {name}: its weight {buf!r} is not an INT8 initializer of the exported graph, "
                              f"so it cannot be stored as {c.value}; export with storage='int8'")
        if any(n.op_type != _DQ or i != 0 for n, i in readers.get(t.name, [])):
            raise ExportError(f"layer {name}: its weight {buf!r} is read by other nodes than DequantizeLinear, so "
                              f"it cannot be stored as {c.value}; export with storage='int8'")
        values = numpy_helper.to_array(t)
        lo, hi = _range(c)
        if values.size and (int(np.min(values)) < lo or int(np.max(values)) > hi):
            raise ExportError(f"layer {name}: {low.w_bits}-bit weight integers in [{int(np.min(values))}, "
                              f"{int(np.max(values))}] do not fit {c.value} [{lo}, {hi}]")
        t.CopyFrom(_convert(t, c.onnx_type))
        types[t.name] = c.onnx_type
    _retype(graph, types)
    return out


def initializer_bytes(path: Any, *, weights_only: bool = False) -> int:
    """Bytes the initializers of the ONNX file at `path` take as stored (INT4 two to a byte; numpy would widen them).
    With `weights_only`, the layers' weights, biases and their scales alone: not the activation quantizers' scales
    nor int64 shape constants. (A float linear layer's weight is stored transposed under a name torch.onnx makes
    up, so layers cannot be told apart by initializer names.)"""
    import onnx
    from onnx import TensorProto, numpy_helper

    def counted(i: Any) -> bool:
        return not weights_only or (i.data_type != TensorProto.INT64 and "quantizer_scale" not in i.name)

    return sum(len(i.raw_data) if i.raw_data else numpy_helper.to_array(i).nbytes
               for i in onnx.load(str(path)).graph.initializer if counted(i))


def stored_weight_bytes(model: Any, layers: Sequence[tuple[str, Lowered]], containers: dict[str, Container]) -> int:
    """The bytes the quantized layers' weight initializers take in `model` (4-bit values two to a byte)."""
    dims = {t.name: t.dims for t in model.graph.initializer}
    return sum(math.ceil(math.prod(dims[low.weight_buffer]) * containers[name].bits / 8)
               for name, low in layers if name in containers and low.weight_buffer in dims)


def widen(model: Any) -> int:
    """Turn the 4-bit initializers of `model` (a ModelProto, edited in place) that only DequantizeLinear reads into
    8-bit ones (INT4 -> INT8, UINT4 -> UINT8) with the same integers; returns how many were widened. Scales and zero
    points stay: a DequantizeLinear's input and zero point are widened together (its type constraint)."""
    from onnx import TensorProto

    wider = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer if t.data_type in wider}
    readers = _consumers(graph)
    names = {t.name for t in graph.initializer}
    todo = {k for k in inits if all(n.op_type == _DQ and i in (0, 2) for n, i in readers.get(k, []))}

    def blocked(k: str) -> bool:
        """A DQ reading `k` has another operand (input or zero point) that may be 4-bit and is not widened."""
        return any(x not in todo and (x in inits or x not in names)
                   for n, _ in readers.get(k, []) for j, x in enumerate(n.input) if j in (0, 2) and x)

    while stuck := {k for k in todo if blocked(k)}:
        todo -= stuck
    for k in todo:
        inits[k].CopyFrom(_convert(inits[k], wider[inits[k].data_type]))
    _retype(graph, {k: inits[k].data_type for k in todo})
    return len(todo)


def pack_nbits(q: torch.Tensor, bits: int, block_size: int = NBITS_BLOCK) -> torch.Tensor:
    """MatMulNBits' B: signed integers q [N, K] in [-2^(b-1), 2^(b-1)-1] stored as q + 2^(b-1) (its default zero
    point), K padded with the zero point to whole blocks, packed low bits first: uint8 [N, n_blocks, blob_size]."""
    n, k = q.shape
    blocks, per = -(-k // block_size), 8 // bits
    zp = 1 << (bits - 1)
    u = torch.full((n, blocks * block_size), zp, dtype=torch.int32)
    u[:, :k] = q.to(torch.int32) + zp
    u = u.reshape(n, blocks, block_size // per, per)
    out = torch.zeros(u.shape[:-1], dtype=torch.int32)
    for i in range(per):
        out |= u[..., i] << (bits * i)
    return out.to(torch.uint8)


def unpack_nbits(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """The signed integers [N, K] that `pack_nbits` stored (the zero point 2^(b-1) subtracted, padding dropped)."""
    n, blocks, blob = packed.shape
    per = 8 // bits
    p = packed.to(torch.int32)
    parts = [(p >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    u = torch.stack(parts, dim=-1).reshape(n, blocks * blob * per)[:, :k]
    return u - (1 << (bits - 1))
