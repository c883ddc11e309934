"""The tables inside a hardware file's metrics: bit lists, format keys ("4x8", "4xfloat", "float"), cost terms and
their per-layer entries, each read strictly (unknown keys refused, every error naming its key path)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Any

from ..core.strict_toml import Table, enum_value, number
from ..errors import brief
from .cost_terms import (
    FLOAT,
    FLOAT_KEY,
    MAX_ACT_BITS,
    MAX_BITS,
    MIN_BITS,
    LayerEntry,
    LayerKind,
    LayerSignature,
    Pair,
    Per,
    Term,
    TermType,
    _key,
    pair_name,
)


def layer_kinds(t: Table, key: str, raw: list[Any]) -> frozenset[LayerKind]:
    parsed = []
    for i, k in enumerate(raw):
        try:
            parsed.append(LayerKind(k))
        except ValueError:
            raise t.fail(f"{key}[{i}]", f"unknown layer kind {brief(k)}; expected one of "
                         f"{', '.join(x.value for x in LayerKind)}") from None
    return frozenset(parsed)


def bits_list(t: Table, key: str, limit: int = MAX_BITS) -> tuple[int, ...]:
    values = t.take(key, list)
    if not values:
        raise t.fail(key, "expected a non-empty array of bit-widths")
    for i, b in enumerate(values):
        check_bits(t, f"{key}[{i}]", b, limit)
    if len(set(values)) != len(values):
        raise t.fail(key, f"duplicate bit-widths in {values}")
    return tuple(sorted(values))


def check_bits(t: Table, key: str, b: Any, limit: int = MAX_BITS) -> int:
    """An integer bit-width in MIN_BITS..limit (MAX_BITS for weights, MAX_ACT_BITS for activations)."""
    if isinstance(b, bool) or not isinstance(b, int):
        raise t.fail(key, f"expected an integer bit-width, found {brief(b)}")
    if not MIN_BITS <= b <= limit:
        raise t.fail(key, f"bit-width {brief(b)} outside {MIN_BITS}..{limit}")
    return b


def parse_pair_key(t: Table, key: str) -> Pair:
    if key == FLOAT_KEY:
        return FLOAT
    match = re.fullmatch(r"([0-9]{1,4})[xX]float", key)  # weight-only: w-bit weights, float activations
    if match is not None:
        return check_bits(t, key, int(match[1])), None
    match = re.fullmatch(r"([0-9]{1,4})[xX]([0-9]{1,4})", key)  # ASCII digits only: "²x4".isdigit() is True
    if match is None:
        raise t.fail(key, 'expected a pair key "WxA" such as "4x8" (weight bits x activation bits)')
    w, a = int(match[1]), int(match[2])
    check_bits(t, key, w)
    check_bits(t, key, a, MAX_ACT_BITS)
    return w, a


Offer = Callable[[Iterable[LayerKind]], tuple[Pair, ...]]  # the formats the target offers layers of some kinds


def parse_term(t: Table, offer: Offer) -> Term:
    ttype = enum_value(t, "type", TermType, "term type")
    scale = number(t, "scale", 1.0)
    kwargs: dict[str, Any] = {"origin": t.where()}
    if ttype is TermType.CONSTANT:  # once per model: no kinds, no layers
        value = number(t, "value", negative=True)
        t.finish()
        return Term(type=ttype, scale=scale, value=value, **kwargs)
    if ttype is TermType.LAYER_TABLE:  # the layers say their own kinds
        lt = t.table("layers")
        if not lt.data:
            raise lt.fail(None, "expected at least one layer entry")
        entries = {}
        for name in lt.data:
            raw = lt.take(name, dict)
            entries[name] = parse_layer_entry(Table(raw, f"{lt.path}.{_key(name)}", t.file), offer)
        lt.finish()
        for name, entry in entries.items():  # a chain covers every format of the layer it reads
            if not entry.chain:
                continue
            where = Table({}, f"{lt.path}.{_key(name)}", t.file)
            if entry.after not in entries:
                raise where.fail("after", f"names no layer of this table ({entry.after!r})")
            prod = entries[entry.after].signature.kind
            needed = offer({prod})
            for own, inner in entry.chain.items():
                missing = [spell(p) for p in needed if p not in inner]
                if missing:
                    raise where.fail(f"chain.{spell(own)}",
                                     f"no value for format(s) {', '.join(missing)} of {entry.after!r}, the layer "
                                     f"it reads")
        t.finish()
        # a measured table prices the kinds it has entries of; a layer of another kind (a matmul in a file
        # written before fxmpq profile timed them: its float time is in the file's constant) costs 0 here
        return Term(type=ttype, scale=scale, layers=MappingProxyType(entries),
                    kinds=frozenset(e.signature.kind for e in entries.values()), **kwargs)
    kinds_raw = t.take("kinds", list, None)
    kinds = frozenset(LayerKind) if kinds_raw is None else layer_kinds(t, "kinds", kinds_raw)
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
            pair = parse_pair_key(vt, key)
            values[pair] = number(vt, key)
        vt.finish()
        needed = offer(kinds)
        missing = [spell(p) for p in needed if p not in values]
        if missing:
            raise vt.fail(None, f"no value for supported pair(s) {', '.join(missing)}")
        kwargs["values"] = MappingProxyType(values)
        if "chain" in t.data:  # what a format boundary adds per unit: chain.<own format>.<format of the layer read>
            ct = t.table("chain")
            chain = {}
            for key in ct.data:
                own = parse_pair_key(ct, key)
                if own not in values:
                    raise ct.fail(key, f"format {spell(own)} has no value in `values`: a chain prices a format the "
                                  f"term prices")
                inner = ct.table(key)
                chain[own] = MappingProxyType({parse_pair_key(inner, k2): number(inner, k2, negative=True)
                                               for k2 in inner.data})
                inner.finish()
            ct.finish()
            kwargs["chain"] = MappingProxyType(chain)
        else:
            t.used.add("chain")  # optional: named among the allowed keys all the same
    t.finish()
    return Term(type=ttype, scale=scale, kinds=kinds, **kwargs)


SHAPE = r"[0-9]+(?:x[0-9]+)*"


def parse_layer_entry(e: Table, offer: Offer) -> LayerEntry:
    """One layer of a layer_table: kind, shape "IN->OUT", weight shape, a value for every format it may run as, and
    optionally `after` (the layer it reads back to back) with a `chain` value per format."""
    kind = enum_value(e, "kind", LayerKind, "layer kind")
    shape = e.take("shape", str)
    if not re.fullmatch(f"{SHAPE}->{SHAPE}", shape):
        raise e.fail("shape", f'expected "INPUT->OUTPUT" shapes with the batch first, such as '
                     f'"1x64x56x56->1x64x56x56", found {shape!r}')
    weight = e.take("weight", str)
    if not re.fullmatch(SHAPE, weight):
        raise e.fail("weight", f'expected the weight shape such as "64x64x3x3", found {weight!r}')
    after = e.take("after", str, None)
    chain: dict[Pair, dict[Pair, float]] = {}
    ct = e.table("chain", None) if "chain" in e.data else None
    if ct is not None:
        if after is None:
            raise e.fail("chain", "a chain needs `after`, the layer this one reads back to back")
        for key in ct.data:
            pair = parse_pair_key(ct, key)
            inner = ct.table(key)
            chain[pair] = {}
            for k2 in inner.data:
                p2 = parse_pair_key(inner, k2)
                v = number(inner, k2, negative=True)
                chain[pair][p2] = v
            inner.finish()
        ct.finish()
    else:
        e.used.add("chain")
    values: dict[Pair, float] = {}
    for key in e.data:
        if key in ("kind", "shape", "weight", "after", "chain"):
            continue
        if key != FLOAT_KEY and not re.fullmatch(r"[0-9]+[xX](?:[0-9]+|float)", key):
            continue  # left for finish() to name as an unknown key
        pair = parse_pair_key(e, key)
        v = number(e, key)
        values[pair] = v
    e.finish()
    needed = offer({kind})
    missing = [spell(p) for p in needed if p not in values]
    if missing:
        raise e.fail(None, f"no value for format(s) {', '.join(missing)}, which the target offers a "
                     f"{kind.value} layer")
    if ct is not None:
        missing = [spell(p) for p in needed if p not in chain]
        if missing:
            raise ct.fail(None, f"no value for format(s) {', '.join(missing)}, which the target offers a "
                          f"{kind.value} layer")
    return LayerEntry(LayerSignature(kind, shape, weight), MappingProxyType(values), after,
                      MappingProxyType({k: MappingProxyType(v) for k, v in chain.items()}))

def spell(p: Pair) -> str:
    """A format as its table key: "float", "4x8", "4xfloat"."""
    return FLOAT_KEY if p == FLOAT else pair_name(p)
