"""LayerRecord: what every pass knows about one quantizable op, kept in its call node's meta["fxmpq"].

The record is the only channel between passes. Capture writes the structural part (kind, parameter references,
conv options, shapes, MACs, params, input tensor); AnnotateCost adds pins and costs; InsertFakeQuant the quantizer
sites; ApplyPolicy the chosen bits and the output quantizer (and re-points the sites of layers that now share an
input quantizer); LowerToQDQ what it emitted, and on each quantize-dequantize node it emits a QuantizerRecord naming the quantizer
the node came from (a residual sum's quantizer belongs to no layer). A pass replaces a record
(`dataclasses.replace`), never mutates it; records are immutable values, so copies of a graph share them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch.fx as fx

from ..hardware.formats import Format
from ..hardware.spec import LayerKind

__all__ = [
    "META_KEY",
    "Applied",
    "ConvOptions",
    "LayerRecord",
    "Lowered",
    "QuantSites",
    "QuantizerRecord",
    "quantizer_nodes",
    "quantizer_record_of",
    "record_of",
    "records",
    "set_record",
    "update_record",
]

META_KEY = "fxmpq"


class _Value:
    """Immutable values: copying a graph (deepcopy of its node.meta) shares them instead of copying."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self

    def __copy__(self) -> Any:
        return self


@dataclass(frozen=True)
class ConvOptions(_Value):
    """The convolution's options as the matcher read them (module attributes or call arguments)."""

    dim: int  # 1 or 2 spatial dimensions
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"


@dataclass(frozen=True)
class QuantSites(_Value):
    """Where InsertFakeQuant put the layer's quantization (module qualnames in the graph module).

    `act_quantizer` is the quantizer the layer's input goes through: its own, until ApplyPolicyPass merges the
    same-bit input quantizers of layers reading one tensor into the first of them and re-points the others here;
    None once ApplyPolicyPass made the layer weight-only (its input stays float).
    """

    weight_quantizer: str
    act_quantizer: str | None
    batchnorm: str | None = None  # the switchable BatchNorm after the layer, if any


@dataclass(frozen=True)
class Applied(_Value):
    """What ApplyPolicy fixed: the layer's format and bits, and the quantizers it added after the layer's output."""

    format: Format
    w_bits: int | None  # None in float
    a_bits: int | None
    # qualname of the quantizer the pass put after the layer's output: an added output quantizer, or the
    # output_bits input quantizer that reads the max pool after the layer (called before the pool too)
    output_quantizer: str | None = None
    bias_rounding: str | None = None  # qualname of the BiasRounding module simulating the int32 bias


@dataclass(frozen=True)
class Lowered(_Value):
    """What LowerToQDQ emitted for the layer: integer range, folded BN, int32 bias, buffer names, kernel form."""

    w_bits: int | None
    a_bits: int | None
    qrange: tuple[int, int] | None
    bn_folded: bool
    int_bias: bool
    weight_buffer: str | None
    as_conv: bool = False  # a Linear emitted as a 1x1 convolution (an integer kernel in ONNX Runtime)
    matmul_nbits: bool = False  # a weight-only Linear emitted as com.microsoft MatMulNBits (packed uint8 weight)
    notes: tuple[str, ...] = ()
    integer_kernel: bool = False  # ONNX Runtime's CPU provider fuses it into an integer kernel (formats.integer_kernel)
    operand_scale: str | None = None  # a matmul's second-operand scale buffer (it has no weight), for the audit


@dataclass(frozen=True)
class LayerRecord(_Value):
    """One quantizable op: identity, structure, cost, and what each pass did to it (None until it ran)."""

    name: str  # the module qualname ("layer1.0.conv1"), "#k" for the k-th extra call of a shared module
    kind: LayerKind
    weight: str  # qualname of the weight parameter; "" for a computed weight or a matmul (its 2nd operand: other_node)
    bias: str | None  # qualname of the bias parameter, None without a bias
    conv: ConvOptions | None  # None for a linear layer or a matmul
    module: str | None  # the module qualname for a module call; None for a functional call
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int  # per sample
    params: int  # weight plus bias elements
    input_node: str  # the name of the fx node the layer reads
    other_node: str | None = None  # a matmul's second operand (fx node name), which takes the weight's place
    bias_computed: bool = False  # the bias is computed in the graph, not a parameter
    weight_computed: bool = False  # the weight is computed from parameters in forward (`weight` is then "")
    # the layer whose output this one reads with nothing but BN, ReLU/ReLU6/Hardtanh or reshapes in between (the
    # two run back to back: in one format, no Q/DQ or layout change between them); None otherwise
    input_layer: str | None = None
    pinned: bool = False
    pin_bits: tuple[int, int] | None = None
    costs: Mapping[tuple[int | None, int | None], Mapping[str, float]] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    # (this layer's format, `input_layer`'s format) -> what the hardware adds to this layer's cost then
    chain_costs: Mapping[tuple[tuple[int | None, int | None], tuple[int | None, int | None]], Mapping[str, float]] = \
        field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    sites: QuantSites | None = None  # None before InsertFakeQuant, and again once ApplyPolicy left it in float
    applied: Applied | None = None
    lowered: Lowered | None = None

    @property
    def searchable(self) -> bool:
        """Whether the search may choose this layer's bits (pinned layers are fixed)."""
        return not self.pinned

    @property
    def groups(self) -> int:
        """Convolution groups (1 for linear layers)."""
        return self.conv.groups if self.conv is not None else 1


@dataclass(frozen=True)
class QuantizerRecord(_Value):
    """A lowered quantize-dequantize node: the activation quantizer (module qualname) whose values it computes, so
    that the export's metadata and the parity diagnosis name the quantizer a user knows."""

    quantizer: str


def record_of(node: fx.Node) -> LayerRecord | None:
    """The record of `node`, or None for nodes that are not quantizable layers."""
    value = node.meta.get(META_KEY)
    return value if isinstance(value, LayerRecord) else None


def set_record(node: fx.Node, record: LayerRecord | QuantizerRecord) -> None:
    """Attach `record` to `node` (the one namespaced key fxmpq writes)."""
    node.meta[META_KEY] = record


def update_record(node: fx.Node, **changes: Any) -> LayerRecord:
    """Replace `node`'s record by a copy with `changes`; returns the new record."""
    rec = record_of(node)
    if rec is None:
        raise KeyError(f"node {node.name} has no layer record")
    new = dataclasses.replace(rec, **changes)
    set_record(node, new)
    return new


def records(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, LayerRecord]]:
    """(node, record) of every quantizable layer in graph order."""
    for node in gm.graph.nodes:
        rec = record_of(node)
        if rec is not None:
            yield node, rec


def quantizer_record_of(node: fx.Node) -> QuantizerRecord | None:
    """The quantizer record of a lowered quantize-dequantize node, or None for any other node."""
    value = node.meta.get(META_KEY)
    return value if isinstance(value, QuantizerRecord) else None


def quantizer_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, QuantizerRecord]]:
    """(node, quantizer record) of every lowered quantize-dequantize node in graph order."""
    for node in gm.graph.nodes:
        rec = quantizer_record_of(node)
        if rec is not None:
            yield node, rec
