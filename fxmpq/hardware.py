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
from typing import Any

from .errors import HardwareSpecError, brief, first_line

log = logging.getLogger(__name__)

__all__ = [
    "HardwareSpec",
    "LayerKind",
    "Metric",
    "Pins",
    "Term",
    "TermType",
    "builtin_hardware",
    "load_hardware",
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


class Per(enum.StrEnum):
    """The layer quantity a TABLE term multiplies."""

    MAC = "mac"
    PARAM = "param"
    LAYER = "layer"


@dataclass(frozen=True)
class Term:
    """One additive cost term: `scale x <quantity given by type>`, applied to layers of `kinds` only."""

    type: TermType
    scale: float = 1.0
    kinds: frozenset[LayerKind] = frozenset(LayerKind)
    brick_bits: int = 2
    per: Per = Per.MAC
    values: Mapping[Pair, float] = field(default_factory=lambda: MappingProxyType({}))

    def evaluate(self, kind: LayerKind, macs: float, params: float, w: int | None, a: int | None) -> float:
        """Cost of one layer of `kind` with `macs` and `params` run at `w`-bit weights and `a`-bit inputs.

        (None, None) is the layer left in float: FLOAT_BITS in bit-based terms, the "float" value of a table.
        """
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


@dataclass(frozen=True)
class Metric:
    """A named cost (BitOps, size, latency, ...) that is the sum of its terms over all layers."""

    name: str
    unit: str
    description: str
    terms: tuple[Term, ...]

    def defined_at(self, w: int | None, a: int | None) -> bool:
        """Whether every term has a value at (w, a) (a lookup table covers only the pairs it lists)."""
        return all(t.type is not TermType.TABLE or (w, a) in t.values for t in self.terms)

    def evaluate(self, kind: LayerKind, macs: float, params: float, w: int | None, a: int | None) -> float:
        """This metric's value for one layer at (w, a) ((None, None): in float)."""
        return sum(t.evaluate(kind, macs, params, w, a) for t in self.terms)


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

    def layer_cost(self, kind: LayerKind, macs: float, params: float, w: int | None, a: int | None
                   ) -> dict[str, float]:
        """Every metric's value for one layer at (w, a) ((None, None): in float)."""
        return {name: m.evaluate(kind, macs, params, w, a) for name, m in self.metrics.items()}


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


def _parse_term(t: _Table, pairs: tuple[tuple[int, int], ...], float_kinds: frozenset[LayerKind]) -> Term:
    type_name = t.take("type", str)
    try:
        ttype = TermType(type_name)
    except ValueError:
        raise t.fail("type", f"unknown term type {type_name!r}; expected one of "
                     f"{', '.join(x.value for x in TermType)}") from None
    scale = _number(t, "scale", 1.0)
    if not math.isfinite(scale) or scale < 0:
        raise t.fail("scale", f"expected a finite non-negative number, found {scale!r}")
    kinds_raw = t.take("kinds", list, None)
    kinds = frozenset(LayerKind) if kinds_raw is None else _kinds(t, "kinds", kinds_raw)
    kwargs: dict[str, Any] = {}
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
    top.finish()
    return HardwareSpec(name=name, description=description, sources=tuple(sources), weight_bits=wbits,
                        act_bits=abits, pairs=pairs, pins=pins, metrics=MappingProxyType(metrics),
                        share_input_quantizer=share, float_kinds=float_kinds, path=file)


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


def pair_name(pair: Iterable[int]) -> str:
    """The "WxA" spelling of a pair, as used in tables and TOML lookup tables."""
    w, a = pair
    return f"{w}x{a}"
