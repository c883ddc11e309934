"""Cost terms of hardware descriptions: layer kinds, the per-layer view a term prices, and the terms and metrics
that turn a layer at a format into a cost (the values hardware.py parses out of a TOML file)."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from ..errors import HardwareSpecError

MIN_BITS, MAX_BITS = 1, 8  # weight bit-widths (INT8 initializers, or INT4 packed)
MAX_ACT_BITS = 16  # activation bit-widths: uint8 Q/DQ up to 8 bits, uint16 above (A16W8, A16W4)
FLOAT_BITS = 32  # what a float layer counts as in bit-based terms (BitOps, weight bits, bricks)
FLOAT = (None, None)  # the (w, a) spelling of "this layer stays in float" in policies and cost tables
FLOAT_KEY = "float"  # its key in a table term's values
# (w, None): weight-only, w-bit weights and float activations (MatMulNBits); "4xfloat" in tables, "W4Afloat" in names

Pair = tuple[int | None, int | None]


class LayerKind(enum.StrEnum):
    """The kinds of quantizable layer; cost terms may apply to a subset of them."""

    CONV = "conv"
    DEPTHWISE_CONV = "depthwise_conv"
    LINEAR = "linear"
    # an activation-by-activation product (attention's Q.K^T and A.V): its second operand takes the weight's place
    # (the w of a (w, a) format, quantized like an activation but with the weight candidates), no parameters
    MATMUL = "matmul"


class TermType(enum.StrEnum):
    """The fixed vocabulary of cost terms a metric is built from (no user text is evaluated)."""

    BITOPS = "bitops"  # MACs x w x a
    WEIGHT_BITS = "weight_bits"  # params x w
    BRICKS = "bricks"  # MACs x ceil(w / k) x ceil(a / k)   (bit-decomposable arrays)
    TABLE = "table"  # quantity x values["WxA"]           (a lookup table per supported pair)
    MACS = "macs"  # MACs, independent of the bits
    PARAMS = "params"  # params, independent of the bits
    LAYER_TABLE = "layer_table"  # layers["name"]["WxA"]  (measured per layer, its shapes checked)
    CONSTANT = "constant"  # value, once per model (what no layer accounts for: pooling, adds, ...)


class Per(enum.StrEnum):
    """The layer quantity a TABLE term multiplies."""

    MAC = "mac"
    PARAM = "param"
    LAYER = "layer"
    ACTIVATION = "activation"  # elements of the layer's input per sample (what quantize/dequantize and layout passes touch)


class Layer(Protocol):
    """What a cost term reads about one layer; a LayerRecord (fxmpq.capture.record) is one, so is a LayerInfo."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> LayerKind: ...
    @property
    def macs(self) -> int: ...
    @property
    def params(self) -> int: ...
    @property
    def weight_shape(self) -> tuple[int, ...]: ...
    @property
    def in_shape(self) -> tuple[int, ...]: ...
    @property
    def out_shape(self) -> tuple[int, ...]: ...
    @property
    def input_layer(self) -> str | None: ...


@dataclass(frozen=True)
class LayerInfo:
    """A layer described by hand (tests, what-if pricing): kind, MACs and params, optionally name and shapes."""

    kind: LayerKind
    macs: int
    params: int
    name: str = ""
    weight_shape: tuple[int, ...] = ()
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    input_layer: str | None = None  # the layer it reads back to back (see LayerRecord.input_layer)


def shape_text(shape: Iterable[int]) -> str:
    """(1, 64, 56, 56) -> "1x64x56x56"."""
    return "x".join(str(int(d)) for d in shape)


@dataclass(frozen=True)
class LayerSignature:
    """What a per-layer measurement was taken on: the layer's kind, input -> output shapes and weight shape."""

    kind: LayerKind
    shape: str  # "1x64x56x56->1x64x56x56" (batch first)
    weight: str  # "64x64x3x3"

    @classmethod
    def of(cls, layer: Layer) -> LayerSignature:
        """The signature of `layer` as traced."""
        return cls(layer.kind, f"{shape_text(layer.in_shape)}->{shape_text(layer.out_shape)}",
                   shape_text(layer.weight_shape))

    def __str__(self) -> str:
        return f"{self.kind.value} {self.shape}, weight {self.weight}"


@dataclass(frozen=True)
class LayerEntry:
    """One layer of a LAYER_TABLE term: its signature and its value per format ((None, None): float).

    `chain[f][g]` (with `after`, the layer it reads back to back) is what the layer's cost changes by when it runs
    as `f` and `after` as `g`: measured alone, each of the two pays the conversions at its edges (quantize,
    dequantize, layout changes); run back to back, ONNX Runtime converts once between them (g != f) or not at all
    (g == f). Usually negative.
    """

    signature: LayerSignature
    values: Mapping[Pair, float]
    after: str | None = None
    chain: Mapping[Pair, Mapping[Pair, float]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Term:
    """One additive cost term: `scale x <quantity given by type>`, applied to layers of `kinds` only.

    A CONSTANT term is no layer's: it contributes `scale x value` once per model (`Metric.constant`) and 0 to
    every layer. A LAYER_TABLE term looks the layer up by name in `layers` and checks its signature.
    """

    type: TermType
    scale: float = 1.0
    kinds: frozenset[LayerKind] = frozenset(LayerKind)
    brick_bits: int = 2
    per: Per = Per.MAC
    values: Mapping[Pair, float] = field(default_factory=lambda: MappingProxyType({}))
    layers: Mapping[str, LayerEntry] = field(default_factory=lambda: MappingProxyType({}))
    value: float = 0.0  # CONSTANT
    # TABLE: chain[f][g] x quantity, added when the layer runs as f and the layer it reads back to back as g (what a
    # format boundary costs: a dequantize, a quantize, a float conversion); pairs it does not list add nothing
    chain: Mapping[Pair, Mapping[Pair, float]] = field(default_factory=lambda: MappingProxyType({}))
    origin: str = field(default="<memory>", compare=False)  # "file: key path", for error messages

    def evaluate(self, layer: Layer, w: int | None, a: int | None) -> float:
        """Cost of one layer run at `w`-bit weights and `a`-bit inputs.

        (None, None) is the layer left in float: FLOAT_BITS in bit-based terms, the "float" value of a table;
        (w, None) is weight-only (float activations count FLOAT_BITS), the "Wxfloat" value of a table.
        A LAYER_TABLE term raises HardwareSpecError, naming the file, when it has no entry for the layer, the
        entry was measured on other shapes, or it prices no value for the format.
        """
        if self.type is TermType.CONSTANT:
            return 0.0
        if self.type is TermType.LAYER_TABLE:
            return self.scale * self._lookup(layer, w, a) if layer.kind in self.kinds else 0.0
        kind, macs, params = layer.kind, layer.macs, layer.params
        if kind not in self.kinds:
            return 0.0
        if a is None and self.type is TermType.TABLE:  # float or weight-only: looked up by its own key
            return self.scale * _per(self.per, layer) * self.values[(w, a)]
        w = FLOAT_BITS if w is None else w
        a = FLOAT_BITS if a is None else a
        if self.type is TermType.BITOPS:
            q = macs * w * a
        elif self.type is TermType.WEIGHT_BITS:
            q = params * w
        elif self.type is TermType.BRICKS:
            q = macs * math.ceil(w / self.brick_bits) * math.ceil(a / self.brick_bits)
        elif self.type is TermType.MACS:
            q = macs
        elif self.type is TermType.PARAMS:
            q = params
        else:  # TABLE
            q = _per(self.per, layer) * self.values[(w, a)]
        return self.scale * q

    def check_layer(self, layer: Layer) -> LayerEntry | None:
        """The LAYER_TABLE entry of `layer`, its signature checked (None for other term types)."""
        if self.type is not TermType.LAYER_TABLE:
            return None
        entry = self.layers.get(layer.name)
        if entry is None:
            raise HardwareSpecError(
                f"{self.origin}.layers: no entry for layer {layer.name!r} ({LayerSignature.of(layer)}): the file "
                f"was measured on another model; profile this one (fxmpq profile)")
        found = LayerSignature.of(layer)
        if entry.signature != found:
            raise HardwareSpecError(
                f"{self.origin}.layers.{_key(layer.name)}: measured on {entry.signature}, but this model's layer is "
                f"{found}: the file was profiled on another model or input shape; profile this one "
                f"(fxmpq profile)")
        if entry.after is not None and entry.after != layer.input_layer:
            reads = f"reads layer {layer.input_layer!r}" if layer.input_layer else "reads no layer back to back"
            raise HardwareSpecError(
                f"{self.origin}.layers.{_key(layer.name)}.after: measured reading layer {entry.after!r} back to back, "
                f"but in this model it {reads}: the file was profiled on another model; profile this one "
                f"(fxmpq profile)")
        return entry

    def chain_delta(self, layer: Layer, fmt: Pair, after: Pair) -> float:
        """What this term adds to `layer`'s cost in `fmt` when the layer it reads back to back runs in `after`
        (a LAYER_TABLE entry's `chain[fmt][after]`, a TABLE's `chain[fmt][after]` x its quantity; 0 otherwise)."""
        if layer.kind not in self.kinds:
            return 0.0
        if self.type is TermType.TABLE:
            return self.scale * _per(self.per, layer) * self.chain.get(fmt, {}).get(after, 0.0) if self.chain else 0.0
        if self.type is not TermType.LAYER_TABLE:
            return 0.0
        entry = self.check_layer(layer)
        return self.scale * entry.chain.get(fmt, {}).get(after, 0.0)

    def _lookup(self, layer: Layer, w: int | None, a: int | None) -> float:
        entry = self.check_layer(layer)
        try:
            return entry.values[(w, a)]
        except KeyError:
            priced = ", ".join(format_name(p) for p in entry.values)
            raise HardwareSpecError(f"{self.origin}.layers.{_key(layer.name)}: no value for layer {layer.name!r} "
                                    f"as {format_name((w, a))}; the file prices {priced}") from None


def _per(per: Per, layer: Layer) -> float:
    """The layer quantity a TABLE term multiplies: MACs, params, 1, or its input's elements per sample (1 for a
    LayerInfo given without shapes)."""
    if per is Per.ACTIVATION:
        return float(math.prod(layer.in_shape[1:])) if layer.in_shape else 1.0
    return {Per.MAC: layer.macs, Per.PARAM: layer.params, Per.LAYER: 1.0}[per]


def _key(name: str) -> str:
    """A TOML key as written in a key path: bare when it can be, quoted otherwise."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


@dataclass(frozen=True)
class Metric:
    """A named cost (BitOps, size, latency, ...): the sum of its terms over all layers, plus its constants."""

    name: str
    unit: str
    description: str
    terms: tuple[Term, ...]

    def defined_at(self, w: int | None, a: int | None) -> bool:
        """Whether every term has a value at (w, a) (a lookup table covers only the pairs it lists)."""
        return all((t.type is not TermType.TABLE or (w, a) in t.values) and t.type is not TermType.LAYER_TABLE
                   for t in self.terms)

    def evaluate(self, layer: Layer, w: int | None, a: int | None) -> float:
        """This metric's value for one layer at (w, a) ((None, None): in float); constants are not a layer's."""
        return sum(t.evaluate(layer, w, a) for t in self.terms)

    def chain_delta(self, layer: Layer, fmt: Pair, after: Pair) -> float:
        """What this metric adds to the layer in `fmt` when the layer it reads back to back runs in `after`."""
        return sum(t.chain_delta(layer, fmt, after) for t in self.terms)

    @property
    def chained(self) -> bool:
        """Whether any layer's cost depends on the format of the layer it reads (a `chain` in a layer table or in
        a table term)."""
        return any(bool(t.chain) or any(e.chain for e in t.layers.values()) for t in self.terms)

    @property
    def constant(self) -> float:
        """The model-level part: the sum of the CONSTANT terms, counted once per model."""
        return sum(t.scale * t.value for t in self.terms if t.type is TermType.CONSTANT)




def format_name(pair: Pair) -> str:
    """"W4A8" for integer bits, "W4Afloat" weight-only, "float" for (None, None) (policies, tables, errors)."""
    w, a = pair
    return "float" if (w, a) == FLOAT else f"W{w}A{'float' if a is None else a}"


def pair_name(pair: Iterable[int | None]) -> str:
    """The "WxA" spelling of a pair ("4xfloat" weight-only), as used in tables and TOML lookup tables."""
    w, a = pair
    return f"{w}x{'float' if a is None else a}"
