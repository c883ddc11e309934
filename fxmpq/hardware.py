"""Hardware descriptions: a strict TOML schema parsed into frozen dataclasses, and per-layer cost terms."""

from __future__ import annotations

import enum
import logging
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from .errors import HardwareSpecError, brief, first_line

log = logging.getLogger(__name__)

__all__ = [
    "HardwareSpec",
    "Layer",
    "LayerInfo",
    "LayerKind",
    "LayerSignature",
    "Metric",
    "Pins",
    "Provenance",
    "Term",
    "TermType",
    "builtin_hardware",
    "format_name",
    "load_hardware",
    "shape_text",
]

MIN_BITS, MAX_BITS = 1, 8
FLOAT_BITS = 32  # what a float layer counts as in bit-based terms (BitOps, weight bits, bricks)
FLOAT = (None, None)  # the (w, a) spelling of "this layer stays in float" in policies and cost tables
FLOAT_KEY = "float"  # its key in a table term's values

Pair = tuple[int | None, int | None]


class LayerKind(enum.StrEnum):
    """The kinds of quantizable layer; cost terms may apply to a subset of them."""

    CONV = "conv"
    DEPTHWISE_CONV = "depthwise_conv"
    LINEAR = "linear"


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


class Layer(Protocol):
    """What a cost term reads about one layer; a LayerRecord (fxmpq.record) is one, so is a LayerInfo."""

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
    origin: str = field(default="<memory>", compare=False)  # "file: key path", for error messages

    def evaluate(self, layer: Layer, w: int | None, a: int | None) -> float:
        """Cost of one layer run at `w`-bit weights and `a`-bit inputs.

        (None, None) is the layer left in float: FLOAT_BITS in bit-based terms, the "float" value of a table.
        A LAYER_TABLE term raises HardwareSpecError, naming the file, when it has no entry for the layer, the
        entry was measured on other shapes, or it prices no value for the format.
        """
        if self.type is TermType.CONSTANT:
            return 0.0
        if self.type is TermType.LAYER_TABLE:
            return self.scale * self._lookup(layer, w, a)
        kind, macs, params = layer.kind, layer.macs, layer.params
        if kind not in self.kinds:
            return 0.0
        if (w, a) == FLOAT and self.type is TermType.TABLE:
            base = {Per.MAC: macs, Per.PARAM: params, Per.LAYER: 1.0}[self.per]
            return self.scale * base * self.values[FLOAT]
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
            base = {Per.MAC: macs, Per.PARAM: params, Per.LAYER: 1.0}[self.per]
            q = base * self.values[(w, a)]
        return self.scale * q

    def check_layer(self, layer: Layer) -> LayerEntry | None:
        """The LAYER_TABLE entry of `layer`, its signature checked (None for other term types)."""
        if self.type is not TermType.LAYER_TABLE:
            return None
        entry = self.layers.get(layer.name)
        if entry is None:
            raise HardwareSpecError(
                f"{self.origin}.layers: no entry for layer {layer.name!r} ({LayerSignature.of(layer)}): the file "
                f"was measured on another model; profile this one (tools/profile_hw.py)")
        found = LayerSignature.of(layer)
        if entry.signature != found:
            raise HardwareSpecError(
                f"{self.origin}.layers.{_key(layer.name)}: measured on {entry.signature}, but this model's layer is "
                f"{found}: the file was profiled on another model or input shape; profile this one "
                f"(tools/profile_hw.py)")
        if entry.after is not None and entry.after != layer.input_layer:
            reads = f"reads layer {layer.input_layer!r}" if layer.input_layer else "reads no layer back to back"
            raise HardwareSpecError(
                f"{self.origin}.layers.{_key(layer.name)}.after: measured reading layer {entry.after!r} back to back, "
                f"but in this model it {reads}: the file was profiled on another model; profile this one "
                f"(tools/profile_hw.py)")
        return entry

    def chain_delta(self, layer: Layer, fmt: Pair, after: Pair) -> float:
        """What this term adds to `layer`'s cost in `fmt` when the layer it reads back to back runs in `after`
        (a LAYER_TABLE entry's `chain[fmt][after]`; 0 otherwise)."""
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
        """Whether any layer's cost depends on the format of the layer it reads (a `chain` in a layer table)."""
        return any(e.chain for t in self.terms if t.type is TermType.LAYER_TABLE for e in t.layers.values())

    @property
    def constant(self) -> float:
        """The model-level part: the sum of the CONSTANT terms, counted once per model."""
        return sum(t.scale * t.value for t in self.terms if t.type is TermType.CONSTANT)


@dataclass(frozen=True)
class Pins:
    """Which layers keep fixed bits (the paper pins the first conv and the last linear at 8/8)."""

    first_layer: bool = True
    last_layer: bool = True
    w_bits: int = 8
    a_bits: int = 8
    layers: tuple[str, ...] = ()

    @property
    def bits(self) -> tuple[int, int]:
        """The (w_bits, a_bits) every pinned layer runs at."""
        return (self.w_bits, self.a_bits)


@dataclass(frozen=True)
class Provenance:
    """Where a measured hardware file comes from (its optional [provenance] table): what, where and how."""

    tool: str = ""
    command: str = ""
    date: str = ""
    model: str = ""
    input: str = ""  # per-sample shape, "3x224x224"
    batch: int | None = None
    threads: int | None = None
    runtime: str = ""  # "onnxruntime 1.32.0 (CPUExecutionProvider)"
    cpu: str = ""  # /proc/cpuinfo "model name"
    clock: str = ""  # "thread_cpu" or "wall" (fxmpq.measure.Clock)
    repeats: int | None = None
    notes: str = ""


@dataclass(frozen=True)
class HardwareSpec:
    """A target: the bit-widths and (w, a) pairs it runs, its pins and its cost metrics."""

    name: str
    description: str
    sources: tuple[str, ...]
    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    pins: Pins
    metrics: Mapping[str, Metric]
    share_input_quantizer: bool = False
    float_kinds: frozenset[LayerKind] = frozenset()  # layer kinds the search may leave in float
    path: str = "<memory>"
    provenance: Provenance | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> HardwareSpec:
        return self  # an immutable value: copies of a model share it

    def supports(self, w: int, a: int) -> bool:
        """Whether the target runs `w`-bit weights with `a`-bit activations."""
        return (w, a) in self.pairs

    def formats(self, kind: LayerKind) -> tuple[Pair, ...]:
        """What a layer of `kind` may run as: every supported (w, a) pair, and FLOAT when the target offers it."""
        return self.pairs + ((FLOAT,) if kind in self.float_kinds else ())

    def runs(self, kind: LayerKind, w: int | None, a: int | None) -> bool:
        """Whether a layer of `kind` may run at (w, a) ((None, None): in float) on this target."""
        return (w, a) in self.formats(kind)

    def layer_cost(self, layer: Layer, w: int | None, a: int | None) -> dict[str, float]:
        """Every metric's value for one layer at (w, a) ((None, None): in float): the one evaluation path."""
        return {name: m.evaluate(layer, w, a) for name, m in self.metrics.items()}

    def chain_cost(self, layer: Layer, fmt: Pair, after: Pair) -> dict[str, float]:
        """Every metric's change for `layer` in `fmt` when the layer it reads back to back runs in `after`."""
        return {name: m.chain_delta(layer, fmt, after) for name, m in self.metrics.items()}

    @property
    def chained(self) -> bool:
        """Whether a layer's cost depends on the format of the layer it reads (some layer table has `chain`s)."""
        return any(m.chained for m in self.metrics.values())

    def model_cost(self) -> dict[str, float]:
        """Every metric's model-level constant (0 without CONSTANT terms), added once to a model's total."""
        return {name: m.constant for name, m in self.metrics.items()}

    def check_layers(self, layers: Iterable[Layer]) -> None:
        """Check that the per-layer tables describe exactly these layers (names and signatures).

        HardwareSpecError naming the file when a table lacks one of the layers, was measured on other shapes, or
        lists layers the model does not have (a file profiled on another model).
        """
        layers = list(layers)
        names = {layer.name for layer in layers}
        for m in self.metrics.values():
            for t in m.terms:
                if t.type is not TermType.LAYER_TABLE:
                    continue
                for layer in layers:
                    t.check_layer(layer)
                extra = [n for n in t.layers if n not in names]
                if extra:
                    shown = ", ".join(map(repr, extra[:5])) + (f", ... ({len(extra) - 5} more)" if len(extra) > 5
                                                               else "")
                    raise HardwareSpecError(
                        f"{t.origin}.layers: entries for {len(extra)} layer(s) this model does not have ({shown}): "
                        f"the file was measured on another model; profile this one (tools/profile_hw.py)")


# --------------------------------------------------------------------------------------------- loading

_MISSING = object()
_PACKAGE = "fxmpq.hardware_specs"


class _Table:
    """A view on one TOML table that hands out typed values and rejects unknown keys, naming the key path."""

    def __init__(self, data: Mapping[str, Any], path: str, file: str):
        self.data, self.path, self.file, self.used = data, path, file, set()

    def where(self, key: str | None = None) -> str:
        p = self.path if key is None else (f"{self.path}.{key}" if self.path else key)
        return f"{self.file}: {p or '<top level>'}"

    def fail(self, key: str | None, msg: str) -> HardwareSpecError:
        return HardwareSpecError(f"{self.where(key)}: {msg}")

    def take(self, key: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.fail(key, "missing required field")
            return default
        value = self.data[key]
        if not _isinstance(value, types):
            raise self.fail(key, f"expected {_type_name(types)}, found {_type_name(type(value))} {brief(value)}")
        return value

    def table(self, key: str, default: Any = _MISSING) -> _Table:
        value = self.take(key, dict, default)
        sub = self.path + "." + key if self.path else key
        return _Table(value, sub, self.file)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(None, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(sorted(self.used))}")


def _isinstance(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "a table"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


def _number(t: _Table, key: str, default: Any = _MISSING) -> float:
    """A TOML number as a float; an integer too large for a float is refused naming the key, like a wrong type."""
    value = t.take(key, float, default)
    try:
        return float(value)
    except OverflowError:
        raise t.fail(key, f"expected a finite non-negative number, found {brief(value)}") from None


def _kinds(t: _Table, key: str, raw: list[Any]) -> frozenset[LayerKind]:
    parsed = []
    for i, k in enumerate(raw):
        try:
            parsed.append(LayerKind(k))
        except ValueError:
            raise t.fail(f"{key}[{i}]", f"unknown layer kind {brief(k)}; expected one of "
                         f"{', '.join(x.value for x in LayerKind)}") from None
    return frozenset(parsed)


def _bits_list(t: _Table, key: str) -> tuple[int, ...]:
    values = t.take(key, list)
    if not values:
        raise t.fail(key, "expected a non-empty array of bit-widths")
    for i, b in enumerate(values):
        _check_bits(t, f"{key}[{i}]", b)
    if len(set(values)) != len(values):
        raise t.fail(key, f"duplicate bit-widths in {values}")
    return tuple(sorted(values))


def _check_bits(t: _Table, key: str, b: Any) -> int:
    if isinstance(b, bool) or not isinstance(b, int):
        raise t.fail(key, f"expected an integer bit-width, found {brief(b)}")
    if not MIN_BITS <= b <= MAX_BITS:
        raise t.fail(key, f"bit-width {brief(b)} outside {MIN_BITS}..{MAX_BITS}")
    return b


def _parse_pair_key(t: _Table, key: str) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]{1,4})[xX]([0-9]{1,4})", key)  # ASCII digits only: "²x4".isdigit() is True
    if match is None:
        raise t.fail(key, 'expected a pair key "WxA" such as "4x8" (weight bits x activation bits)')
    w, a = int(match[1]), int(match[2])
    _check_bits(t, key, w)
    _check_bits(t, key, a)
    return w, a


E = TypeVar("E", bound=enum.Enum)


def _enum(t: _Table, key: str, cls: type[E], what: str) -> E:
    """The string at `key` as a member of the enum `cls`; HardwareSpecError listing the members otherwise."""
    value = t.take(key, str)
    try:
        return cls(value)
    except ValueError:
        raise t.fail(key, f"unknown {what} {value!r}; expected one of {', '.join(x.value for x in cls)}") from None


def _parse_term(t: _Table, pairs: tuple[tuple[int, int], ...], float_kinds: frozenset[LayerKind]) -> Term:
    ttype = _enum(t, "type", TermType, "term type")
    scale = _number(t, "scale", 1.0)
    if not math.isfinite(scale) or scale < 0:
        raise t.fail("scale", f"expected a finite non-negative number, found {scale!r}")
    kwargs: dict[str, Any] = {"origin": t.where()}
    if ttype is TermType.CONSTANT:  # once per model: no kinds, no layers
        value = float(t.take("value", float))
        if not math.isfinite(value):
            raise t.fail("value", f"expected a finite number, found {value!r}")
        t.finish()
        return Term(type=ttype, scale=scale, value=value, **kwargs)
    if ttype is TermType.LAYER_TABLE:  # the layers say their own kinds
        lt = t.table("layers")
        if not lt.data:
            raise lt.fail(None, "expected at least one layer entry")
        entries = {}
        for name in lt.data:
            raw = lt.take(name, dict)
            entries[name] = _parse_layer_entry(_Table(raw, f"{lt.path}.{_key(name)}", t.file), pairs, float_kinds)
        lt.finish()
        for name, entry in entries.items():  # a chain covers every format of the layer it reads
            if not entry.chain:
                continue
            where = _Table({}, f"{lt.path}.{_key(name)}", t.file)
            if entry.after not in entries:
                raise where.fail("after", f"names no layer of this table ({entry.after!r})")
            prod = entries[entry.after].signature.kind
            needed = [*pairs, FLOAT] if prod in float_kinds else list(pairs)
            for own, inner in entry.chain.items():
                missing = [FLOAT_KEY if p == FLOAT else pair_name(p) for p in needed if p not in inner]
                if missing:
                    raise where.fail(f"chain.{FLOAT_KEY if own == FLOAT else pair_name(own)}",
                                     f"no value for format(s) {', '.join(missing)} of {entry.after!r}, the layer "
                                     f"it reads")
        t.finish()
        return Term(type=ttype, scale=scale, layers=MappingProxyType(entries), **kwargs)
    kinds_raw = t.take("kinds", list, None)
    kinds = frozenset(LayerKind) if kinds_raw is None else _kinds(t, "kinds", kinds_raw)
    if ttype is TermType.BRICKS:
        k = t.take("brick_bits", int)
        if not MIN_BITS <= k <= MAX_BITS:
            raise t.fail("brick_bits", f"brick width {brief(k)} outside {MIN_BITS}..{MAX_BITS}")
        kwargs["brick_bits"] = k
    if ttype is TermType.TABLE:
        per = t.take("per", str, "mac")
        try:
            kwargs["per"] = Per(per)
        except ValueError:
            raise t.fail("per", f"expected one of {', '.join(p.value for p in Per)}, found {per!r}") from None
        vt = t.table("values")
        values = {}
        for key in vt.data:
            pair = FLOAT if key == FLOAT_KEY else _parse_pair_key(vt, key)
            v = _number(vt, key)
            if not math.isfinite(v) or v < 0:
                raise vt.fail(key, f"expected a finite non-negative number, found {v!r}")
            values[pair] = v
        vt.finish()
        needed = [*pairs, FLOAT] if kinds & float_kinds else list(pairs)
        missing = [FLOAT_KEY if p == FLOAT else pair_name(p) for p in needed if p not in values]
        if missing:
            raise vt.fail(None, f"no value for supported pair(s) {', '.join(missing)}")
        kwargs["values"] = MappingProxyType(values)
    t.finish()
    return Term(type=ttype, scale=scale, kinds=kinds, **kwargs)


_SHAPE = r"[0-9]+(?:x[0-9]+)*"


def _parse_layer_entry(e: _Table, pairs: tuple[tuple[int, int], ...], float_kinds: frozenset[LayerKind]
                       ) -> LayerEntry:
    """One layer of a layer_table: kind, shape "IN->OUT", weight shape, a value for every format it may run as, and
    optionally `after` (the layer it reads back to back) with a `chain` value per format."""
    kind = _enum(e, "kind", LayerKind, "layer kind")
    shape = e.take("shape", str)
    if not re.fullmatch(f"{_SHAPE}->{_SHAPE}", shape):
        raise e.fail("shape", f'expected "INPUT->OUTPUT" shapes with the batch first, such as '
                     f'"1x64x56x56->1x64x56x56", found {shape!r}')
    weight = e.take("weight", str)
    if not re.fullmatch(_SHAPE, weight):
        raise e.fail("weight", f'expected the weight shape such as "64x64x3x3", found {weight!r}')
    after = e.take("after", str, None)
    chain: dict[Pair, dict[Pair, float]] = {}
    ct = e.table("chain", None) if "chain" in e.data else None
    if ct is not None:
        if after is None:
            raise e.fail("chain", "a chain needs `after`, the layer this one reads back to back")
        for key in ct.data:
            pair = FLOAT if key == FLOAT_KEY else _parse_pair_key(ct, key)
            inner = ct.table(key)
            chain[pair] = {}
            for k2 in inner.data:
                p2 = FLOAT if k2 == FLOAT_KEY else _parse_pair_key(inner, k2)
                v = float(inner.take(k2, float))
                if not math.isfinite(v):
                    raise inner.fail(k2, f"expected a finite number, found {v!r}")
                chain[pair][p2] = v
            inner.finish()
        ct.finish()
    else:
        e.used.add("chain")
    values: dict[Pair, float] = {}
    for key in e.data:
        if key in ("kind", "shape", "weight", "after", "chain"):
            continue
        if key != FLOAT_KEY and not re.fullmatch(r"[0-9]+[xX][0-9]+", key):
            continue  # left for finish() to name as an unknown key
        pair = FLOAT if key == FLOAT_KEY else _parse_pair_key(e, key)
        v = float(e.take(key, float))
        if not math.isfinite(v) or v < 0:
            raise e.fail(key, f"expected a finite non-negative number, found {v!r}")
        values[pair] = v
    e.finish()
    needed = [*pairs, FLOAT] if kind in float_kinds else list(pairs)
    missing = [FLOAT_KEY if p == FLOAT else pair_name(p) for p in needed if p not in values]
    if missing:
        raise e.fail(None, f"no value for format(s) {', '.join(missing)}, which the target offers a "
                     f"{kind.value} layer")
    if ct is not None:
        missing = [FLOAT_KEY if p == FLOAT else pair_name(p) for p in needed if p not in chain]
        if missing:
            raise ct.fail(None, f"no value for format(s) {', '.join(missing)}, which the target offers a "
                          f"{kind.value} layer")
    return LayerEntry(LayerSignature(kind, shape, weight), MappingProxyType(values), after,
                      MappingProxyType({k: MappingProxyType(v) for k, v in chain.items()}))


_PROVENANCE_STR = ("tool", "command", "date", "model", "input", "runtime", "cpu", "clock", "notes")
_PROVENANCE_INT = ("batch", "threads", "repeats")


def _parse_provenance(p: _Table) -> Provenance:
    kwargs: dict[str, Any] = {k: p.take(k, str, "") for k in _PROVENANCE_STR}
    for k in _PROVENANCE_INT:
        v = p.take(k, int, None)
        if v is not None and v < 1:
            raise p.fail(k, f"expected a positive integer, found {v}")
        kwargs[k] = v
    p.finish()
    return Provenance(**kwargs)


def parse_hardware(data: Mapping[str, Any], file: str = "<memory>") -> HardwareSpec:
    """Build a HardwareSpec from a parsed TOML document; any defect raises HardwareSpecError."""
    top = _Table(data, "", file)
    tg = top.table("target")
    name = tg.take("name", str)
    description = tg.take("description", str, "")
    sources = tg.take("sources", list, [])
    for i, s in enumerate(sources):
        if not isinstance(s, str):
            raise tg.fail(f"sources[{i}]", f"expected a string, found {brief(s)}")
    wbits = _bits_list(tg, "weight_bits")
    abits = _bits_list(tg, "act_bits")
    raw_pairs = tg.take("pairs", list, None)
    if raw_pairs is None:
        pairs = tuple((w, a) for w in wbits for a in abits)
    else:
        parsed = []
        for i, p in enumerate(raw_pairs):
            key = f"pairs[{i}]"
            if not isinstance(p, list) or len(p) != 2:
                raise tg.fail(key, f"expected a [w_bits, a_bits] array, found {brief(p)}")
            w, a = _check_bits(tg, key, p[0]), _check_bits(tg, key, p[1])
            if w not in wbits or a not in abits:
                raise tg.fail(key, f"unsupported pair [{w}, {a}]: weight bits must be in {list(wbits)} "
                              f"and activation bits in {list(abits)}")
            parsed.append((w, a))
        if not parsed:
            raise tg.fail("pairs", "expected at least one [w_bits, a_bits] pair")
        if len(set(parsed)) != len(parsed):
            raise tg.fail("pairs", "duplicate pairs")
        pairs = tuple(sorted(parsed))
    share = tg.take("share_input_quantizer", bool, False)
    float_kinds = _kinds(tg, "float_kinds", tg.take("float_kinds", list, []))
    tg.finish()

    pt = top.table("pins", {})
    pins = Pins(
        first_layer=pt.take("first_layer", bool, True),
        last_layer=pt.take("last_layer", bool, True),
        w_bits=_check_bits(pt, "w_bits", pt.take("w_bits", int, 8)),
        a_bits=_check_bits(pt, "a_bits", pt.take("a_bits", int, 8)),
        layers=tuple(pt.take("layers", list, [])),
    )
    for i, layer in enumerate(pins.layers):
        if not isinstance(layer, str):
            raise pt.fail(f"layers[{i}]", f"expected a layer name (string), found {brief(layer)}")
    pt.finish()
    pins_anything = pins.first_layer or pins.last_layer or bool(pins.layers)
    if pins_anything and pins.bits not in pairs:
        raise pt.fail(None, f"pinned bits w_bits = {pins.w_bits}, a_bits = {pins.a_bits} are not a supported "
                      f"pair; supported pairs: {', '.join(pair_name(p) for p in pairs)}")

    mt = top.table("metrics")
    if not mt.data:
        raise mt.fail(None, "expected at least one metric, e.g. [metrics.bitops]")
    metrics = {}
    for mname in mt.data:
        if not mname.isidentifier():
            raise mt.fail(mname, "a metric name must be an identifier (letters, digits, underscores), "
                          "since budgets name it: Budget(<metric>=...)")
        m = mt.table(mname)
        unit = m.take("unit", str, "")
        mdesc = m.take("description", str, "")
        raw_terms = m.take("terms", list)
        if not raw_terms:
            raise m.fail("terms", "expected a non-empty array of terms")
        terms = []
        for i, rt in enumerate(raw_terms):
            if not isinstance(rt, dict):
                raise m.fail(f"terms[{i}]", f"expected a table such as {{ type = \"bitops\" }}, found {brief(rt)}")
            terms.append(_parse_term(_Table(rt, f"{m.path}.terms[{i}]", file), pairs, float_kinds))
        m.finish()
        metrics[mname] = Metric(name=mname, unit=unit, description=mdesc, terms=tuple(terms))
    pv = top.take("provenance", dict, None)
    provenance = _parse_provenance(_Table(pv, "provenance", file)) if pv is not None else None
    top.finish()
    return HardwareSpec(name=name, description=description, sources=tuple(sources), weight_bits=wbits,
                        act_bits=abits, pairs=pairs, pins=pins, metrics=MappingProxyType(metrics),
                        share_input_quantizer=share, float_kinds=float_kinds, path=file, provenance=provenance)


def builtin_hardware() -> list[str]:
    """Names of the hardware descriptions shipped with fxmpq."""
    files = resources.files(_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


def load_hardware(name_or_path: str | Path | HardwareSpec) -> HardwareSpec:
    """Load a shipped description by name ("bitops") or a user's TOML file by path; strict schema."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    if not isinstance(name_or_path, str | Path):
        raise HardwareSpecError(f"hardware must be a name, a path or a HardwareSpec, found {type(name_or_path).__name__}")
    text_path = str(name_or_path)
    p = Path(text_path)
    if p.suffix == ".toml" or p.exists() or "/" in text_path or "\\" in text_path:
        if not p.is_file():
            raise HardwareSpecError(f"{text_path}: no such hardware description file")
        raw = p.read_bytes()
        file = str(p)
    else:
        ref = resources.files(_PACKAGE) / f"{text_path}.toml"
        if not ref.is_file():
            raise HardwareSpecError(f"unknown hardware {text_path!r}: shipped targets are "
                                    f"{', '.join(builtin_hardware())}; or give the path of a .toml file")
        raw = ref.read_bytes()
        file = f"{text_path}.toml (shipped)"
    return loads_hardware(raw, file)


def loads_hardware(raw: bytes | str, file: str = "<memory>") -> HardwareSpec:
    """Parse the text of a hardware description; `file` names it in error messages."""
    if not isinstance(raw, bytes | str):
        raise HardwareSpecError(f"{file}: expected the text of a TOML file (str or bytes), found {type(raw).__name__}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise HardwareSpecError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise HardwareSpecError(f"{file}: invalid TOML: {e}") from None
    except RecursionError:
        raise HardwareSpecError(f"{file}: invalid TOML: arrays or tables nested too deeply") from None
    except (ValueError, OverflowError) as e:  # an integer of more than 4300 digits, a surrogate, ...
        reason = ("an integer has more digits than Python converts (4300)" if "digits" in str(e)
                  else first_line(e) or type(e).__name__)
        raise HardwareSpecError(f"{file}: invalid TOML: {reason}") from None
    try:
        return parse_hardware(data, file)
    except RecursionError:  # a value nested deep enough that printing it in a message recurses too far
        raise HardwareSpecError(f"{file}: a value is nested too deeply to be a hardware description") from None


def format_name(pair: Pair) -> str:
    """"W4A8" for integer bits, "float" for (None, None) (policies, tables, error messages)."""
    w, a = pair
    return "float" if (w, a) == FLOAT else f"W{w}A{a}"


def pair_name(pair: Iterable[int]) -> str:
    """The "WxA" spelling of a pair, as used in tables and TOML lookup tables."""
    w, a = pair
    return f"{w}x{a}"
