"""Indicators: the learned step size of every layer at every candidate bit (weights and activations), as JSON."""

from __future__ import annotations

import enum
import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from ..core.jsonio import dump_json, read_json
from ..core.tables import render
from ..errors import ArgumentError, IndicatorError, brief

log = logging.getLogger(__name__)

__all__ = ["Cleaned", "Cleaning", "Indicators"]

FORMAT = "fxmpq.indicators/1"


class Cleaning(enum.StrEnum):
    """What the search does with a step size that is smaller than the next higher bit-width's (a non-monotone row)."""

    PAPER = "paper"  # price that bit-width prohibitively (a large finite price), as the paper does
    ISOTONIC = "isotonic"  # repair the row to be non-increasing in the bits (pool adjacent violators)

    @classmethod
    def coerce(cls, value: Cleaning | str) -> Cleaning:
        """`value` as a Cleaning (its string value is accepted); ArgumentError naming the allowed values otherwise."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise ArgumentError(f"clean={value!r}: expected one of {', '.join(c.value for c in cls)}") from None


class Cleaned(NamedTuple):
    """Indicators after cleaning and, per layer, the bit-widths priced prohibitively (the paper's rule)."""

    indicators: Indicators
    priced_weight: Mapping[str, frozenset[int]]
    priced_act: Mapping[str, frozenset[int]]


def _pav_decreasing(y: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit (pool adjacent violators) of `y` ordered by ascending bits."""
    vals: list[float] = []
    counts: list[int] = []
    for v in -y:  # fit increasing on -y
        vals.append(float(v))
        counts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            c = counts[-2] + counts[-1]
            vals[-2] = (vals[-2] * counts[-2] + vals[-1] * counts[-1]) / c
            counts[-2] = c
            vals.pop()
            counts.pop()
    return -np.repeat(vals, counts)


def _priced(row: Mapping[int, float]) -> frozenset[int]:
    """The bits whose step size is smaller than the next higher candidate bit's."""
    bits = sorted(row)
    return frozenset(b for b, hi in itertools.pairwise(bits) if row[b] < row[hi])


@dataclass(frozen=True)
class Indicators:
    """Per layer and candidate bit: the learned weight and activation step sizes (the importance indicators).

    `act` may be empty for a weight-only search. The JSON form is the one of the paper's released indicators
    (keys "candidate_bits", "layers", "weight", "act"; bits as string keys), so those files load as they are.
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    weight: Mapping[str, Mapping[int, float]]
    act: Mapping[str, Mapping[int, float]] = field(default_factory=lambda: MappingProxyType({}))
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))
        for kind, table in (("weight", self.weight), ("act", self.act)):
            frozen = {}
            for layer, per_bit in table.items():
                if layer not in self.layers:
                    raise IndicatorError(f"{kind} indicators name layer {brief(layer)}, which is not in layers")
                row = {}
                for b, v in per_bit.items():
                    if b not in self.bits:
                        raise IndicatorError(f"{kind}[{brief(layer)}] has bit-width {brief(b)}, not a candidate "
                                             f"{self.bits}")
                    try:
                        ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v > 0
                    except OverflowError:  # an int too large for a float
                        ok = False
                    if not ok:
                        raise IndicatorError(f"{kind}[{brief(layer)}][{b}] must be a positive finite step size "
                                             f"(a number), found {brief(v)}")
                    row[int(b)] = float(v)
                frozen[layer] = MappingProxyType(row)
            object.__setattr__(self, kind, MappingProxyType(frozen))
        missing = [n for n in self.layers if n not in self.weight]
        if missing:
            raise IndicatorError(f"no weight indicators for layer(s): {', '.join(missing)}")

    @property
    def has_act(self) -> bool:
        """Whether activation indicators are present (absent for a weight-only search)."""
        return bool(self.act)

    def check_covers(self, layers: Sequence[str], w_bits: Sequence[int], a_bits: Sequence[int] = ()) -> None:
        """Raise IndicatorError listing every layer and bit that `layers`/`bits` need but these lack."""
        problems = []
        missing = [n for n in layers if n not in self.weight]
        if missing:
            problems.append(f"no indicators for layer(s) {', '.join(missing)}")
        for kind, table, bits in (("weight", self.weight, w_bits), ("activation", self.act, a_bits)):
            holes = [f"{n}@{b}" for n in layers if n in table for b in bits if b not in table[n]]
            if a_bits and kind == "activation":
                holes += [f"{n}" for n in layers if n in self.weight and n not in table]
            if holes:
                problems.append(f"{kind} indicators missing for {', '.join(holes[:20])}"
                                + (f" ... ({len(holes) - 20} more)" if len(holes) > 20 else ""))
        if problems:
            raise IndicatorError("indicators do not match the analysis: " + "; ".join(problems)
                                 + f" (indicators have bits {list(self.bits)} for {len(self.layers)} layers)")

    def cleaned(self, mode: Cleaning | str = Cleaning.PAPER) -> Cleaned:
        """These indicators cleaned by `mode`, with the bit-widths each layer prices prohibitively.

        PAPER keeps every step size and prices a bit-width whose step size is smaller than the next higher
        bit-width's; ISOTONIC replaces each row by its least-squares non-increasing fit and prices nothing.
        """
        mode = Cleaning.coerce(mode)
        if mode is Cleaning.ISOTONIC:
            def fit(row: Mapping[int, float]) -> dict[int, float]:
                bits = sorted(row)
                return dict(zip(bits, _pav_decreasing(np.array([row[b] for b in bits])).tolist()))

            out = Indicators(layers=self.layers, bits=self.bits, weight={n: fit(r) for n, r in self.weight.items()},
                             act={n: fit(r) for n, r in self.act.items()}, meta=self.meta)
            none: frozenset[int] = frozenset()
            return Cleaned(out, MappingProxyType(dict.fromkeys(self.weight, none)),
                           MappingProxyType(dict.fromkeys(self.act, none)))
        return Cleaned(self, MappingProxyType({n: _priced(r) for n, r in self.weight.items()}),
                       MappingProxyType({n: _priced(r) for n, r in self.act.items()}))

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (the paper's released layout plus a format tag)."""
        desc = sorted(self.bits, reverse=True)
        out: dict[str, Any] = {"format": FORMAT, **dict(self.meta), "candidate_bits": desc,
                               "layers": list(self.layers)}
        out["weight"] = {n: {str(b): self.weight[n][b] for b in desc if b in self.weight[n]} for n in self.layers}
        out["act"] = {n: {str(b): self.act[n][b] for b in desc if b in self.act[n]}
                      for n in self.layers if n in self.act}
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to `path` when given."""
        return dump_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, source: str | Path) -> Indicators:
        """Read indicators from a JSON file path or JSON text (the paper's released format included)."""
        data, where = read_json(source, IndicatorError, "indicators")
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>") -> Indicators:
        """Build from the dict form; errors name `where` and the offending key."""
        if not isinstance(data, dict):
            raise IndicatorError(f"{where}: expected a JSON object")
        for key in ("candidate_bits", "layers", "weight"):
            if key not in data:
                raise IndicatorError(f"{where}: missing key {key!r}")

        def table(key: str) -> dict[str, dict[int, float]]:
            raw = data.get(key, {})
            if not isinstance(raw, dict):
                raise IndicatorError(f"{where}: {key}: expected an object of layer -> {{bit: step}}")
            out = {}
            for layer, row in raw.items():
                if not isinstance(row, dict):
                    raise IndicatorError(f"{where}: {key}.{layer[:60]}: expected an object of bit -> step size, "
                                         f"found {brief(row)}")
                bad = [b for b in row if not re.fullmatch(r"[0-9]{1,2}", b)]
                if bad:
                    raise IndicatorError(f"{where}: {key}.{layer[:60]}: bit keys must be small integers such as "
                                         f"\"4\", found {brief(bad[0])}")
                out[layer] = {int(b): v for b, v in row.items()}
            return out

        bits = data["candidate_bits"]
        if not (isinstance(bits, list) and bits and all(isinstance(b, int) and not isinstance(b, bool)
                                                        and 1 <= b <= 32 for b in bits)):
            raise IndicatorError(f"{where}: candidate_bits must be a non-empty array of bit-widths (integers 1..32) "
                                 f"such as [6, 5, 4, 3, 2], found {brief(bits)}")
        layers = data["layers"]
        if not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
            raise IndicatorError(f"{where}: layers must be an array of layer names (strings), found {brief(layers)}")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise IndicatorError(f"{where}: format {brief(fmt)} is not {FORMAT!r}; not an fxmpq indicators file")
        meta = {k: v for k, v in data.items()
                if k not in ("format", "candidate_bits", "layers", "weight", "act") and isinstance(v, str)}
        try:
            return cls(layers=tuple(layers), bits=tuple(bits), weight=table("weight"), act=table("act"), meta=meta)
        except IndicatorError as e:
            raise IndicatorError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise IndicatorError(f"{where}: malformed indicators ({e})") from None

    def table(self) -> str:
        """A printable table: one row per layer, weight and activation step sizes per bit."""
        desc = sorted(self.bits, reverse=True)
        header = ["layer"] + [f"w@{b}" for b in desc] + ([f"a@{b}" for b in desc] if self.has_act else [])
        rows = []
        for n in self.layers:
            r = [n] + [f"{self.weight[n][b]:.4g}" if b in self.weight[n] else "-" for b in desc]
            if self.has_act:
                r += [f"{self.act[n][b]:.4g}" if n in self.act and b in self.act[n] else "-" for b in desc]
            rows.append(r)
        return render(header, rows)
