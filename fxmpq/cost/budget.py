"""Budget: limits on the hardware's cost metrics, absolute or relative to the analysed model, and their conjunction."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import BudgetError, PolicyError, brief
from .policy import Policy

if TYPE_CHECKING:
    from .analysis import Analysis

log = logging.getLogger(__name__)

__all__ = ["Budget"]

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BYTES = {"B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30}
_TERM = re.compile(r"^(?:w(?P<w>\d+)a(?P<a>\d+)|c(?P<c>[0-9.eE+-]+)|"
                   r"(?P<metric>[A-Za-z_]\w*)\s*<=\s*(?P<num>[0-9.eE+-]+)\s*(?P<unit>[A-Za-z]*))$")


@dataclass(frozen=True)
class _Rel:
    """A limit resolved against an analysis: uniform (w, a) cost of `metric`, or FP32 `metric` / ratio."""

    kind: str  # "uniform" | "compression"
    metric: str
    w: int = 0
    a: int = 0
    ratio: float = 0.0

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"{self.metric}<=uniform W{self.w}A{self.a}"
        return f"{self.metric}<=FP32/{self.ratio:g}"


@dataclass(frozen=True, init=False)
class Budget:
    """Upper limits on cost metrics; every limit must hold (`a & b` is the conjunction).

    `Budget(bitops=9.7e9, size=2e8)` gives absolute limits in the metric's unit; `Budget.uniform(3, 4)` means
    "no more BitOps than every searchable layer at W3A4" (pinned layers at their pins; the paper's 3MP/4MP);
    `Budget.compression(12.2)` means "size <= FP32 size / 12.2". `Budget.parse` reads the string form.
    """

    absolute: Mapping[str, float]
    relative: tuple[_Rel, ...]
    unit_bytes: Mapping[str, float]  # metric -> limit given in bytes (resolved against the metric's unit)

    def __init__(self, /, **limits: float):  # positional-only: a metric may be called "self"
        clean = {}
        for k, v in limits.items():
            try:
                ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v >= 0
            except OverflowError:  # an int too large for a float
                ok = False
            if not ok:
                raise BudgetError(f"budget {k}={brief(v)}: expected a finite non-negative number")
            clean[k] = float(v)
        object.__setattr__(self, "absolute", MappingProxyType(clean))
        object.__setattr__(self, "relative", ())
        object.__setattr__(self, "unit_bytes", MappingProxyType({}))

    @classmethod
    def _make(cls, absolute: Mapping[str, float], relative: tuple[_Rel, ...],
              unit_bytes: Mapping[str, float]) -> Budget:
        b = cls(**absolute)
        object.__setattr__(b, "relative", tuple(relative))
        object.__setattr__(b, "unit_bytes", MappingProxyType(dict(unit_bytes)))
        return b

    @classmethod
    def coerce(cls, value: Budget | str | Mapping[str, float]) -> Budget:
        """`value` as a Budget: a Budget as it is, a string through `parse`, a {metric: limit} mapping as limits."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise BudgetError(f"budget dict keys must be metric names (strings), found {bad[0]!r}")
            return cls(**value)
        hint = (f"; for an absolute limit write {{'bitops': {value}}} or 'bitops<={value}'"
                if isinstance(value, int | float) and not isinstance(value, bool) else "")
        raise BudgetError(f"budget must be a Budget, a budget string such as 'w3a4&c12.2' or a {{metric: limit}} "
                          f"dict, found {type(value).__name__} {brief(value)}{hint}")

    @classmethod
    def uniform(cls, w_bits: int, a_bits: int, *, metric: str = "bitops") -> Budget:
        """No more of `metric` than the whole model with every searchable layer at (w_bits, a_bits)."""
        return cls._make({}, (_Rel("uniform", metric, w=int(w_bits), a=int(a_bits)),), {})

    @classmethod
    def compression(cls, ratio: float, *, metric: str = "size") -> Budget:
        """`metric` (model size by default) at most its FP32 value divided by `ratio`."""
        if isinstance(ratio, bool) or not (isinstance(ratio, int | float) and math.isfinite(ratio)):
            raise BudgetError(f"compression ratio must be a finite number >= 1, found {brief(ratio)}")
        if ratio < 1:
            larger = f"{1 / ratio:.3g}x larger than FP32" if ratio > 0 else "of any size"
            raise BudgetError(f"compression ratio {ratio:g} is below 1: it allows a model {larger} "
                              f"({metric} <= FP32 {metric} / {ratio:g}), which limits nothing; give a "
                              f"ratio >= 1 such as c4 (4x smaller than FP32) or an absolute limit such as "
                              f"'{metric}<=4MB'")
        return cls._make({}, (_Rel("compression", metric, ratio=float(ratio)),), {})

    def __and__(self, other: Budget) -> Budget:
        if not isinstance(other, Budget):
            return NotImplemented
        absolute = dict(self.absolute)
        for k, v in other.absolute.items():
            absolute[k] = min(v, absolute.get(k, math.inf))
        ub = dict(self.unit_bytes)
        for k, v in other.unit_bytes.items():
            ub[k] = min(v, ub.get(k, math.inf))
        rel = self.relative + tuple(r for r in other.relative if r not in self.relative)
        return Budget._make(absolute, rel, ub)

    @property
    def metrics(self) -> list[str]:
        """The metrics this budget limits."""
        names = [*self.absolute, *self.unit_bytes, *(r.metric for r in self.relative)]
        return list(dict.fromkeys(names))

    def __str__(self) -> str:
        parts = [f"{k}<={v:.6g}" for k, v in self.absolute.items()]
        parts += [f"{k}<={v:.6g}B" for k, v in self.unit_bytes.items()]
        parts += [str(r) for r in self.relative]
        return " & ".join(parts) or "(no limit)"

    def __repr__(self) -> str:
        return f"Budget({self})"

    # ---------------------------------------------------------------- resolution
    def resolve(self, analysis: Analysis) -> dict[str, float]:
        """Metric name -> absolute upper limit for this model on `analysis.hardware` (the tightest one wins)."""
        hw = analysis.hardware
        unknown = [m for m in self.metrics if m not in hw.metrics]
        if unknown:
            raise BudgetError(f"budget {self} names metric(s) {', '.join(map(repr, unknown))} that hardware "
                                   f"{hw.name!r} lacks; its metrics: {', '.join(hw.metrics)}")
        out: dict[str, float] = {}

        def put(metric: str, value: float) -> None:
            out[metric] = min(value, out.get(metric, math.inf))

        for k, v in self.absolute.items():
            put(k, v)
        for k, v in self.unit_bytes.items():
            unit = hw.metrics[k].unit.lower()
            if unit in ("bit", "bits"):
                put(k, v * 8)
            elif unit in ("byte", "bytes", "b"):
                put(k, v)
            else:
                raise BudgetError(f"budget {k}<={v:g} bytes: metric {k!r} of hardware {hw.name!r} is in "
                                       f"{hw.metrics[k].unit!r}, not bits or bytes; give a plain number")
        fp32 = None
        for r in self.relative:
            if r.kind == "uniform":
                try:
                    value = analysis.cost(Policy.uniform(analysis, r.w, r.a))[r.metric]
                except PolicyError as e:
                    raise BudgetError(f"budget {r}: {e}") from None
            else:
                fp32 = analysis.fp32_cost() if fp32 is None else fp32
                value = fp32[r.metric] / r.ratio
                if not math.isfinite(value):
                    raise BudgetError(f"budget {r}: metric {r.metric!r} of hardware {hw.name!r} has no FP32 "
                                           "value (a lookup-table metric); give an absolute limit instead")
            put(r.metric, value)
        return out

    # ---------------------------------------------------------------- strings
    @classmethod
    def parse(cls, text: str) -> Budget:
        """Read a budget string: terms joined by `&`.

        Terms: `w3a4` (BitOps of uniform W3A4), `c12.2` (size <= FP32 size / 12.2), `metric<=NUMBER[SUFFIX]`
        with SI suffixes k, M, G, T (`bitops<=9.7G`) or byte units B, KB, MB, GB, KiB, MiB, GiB for metrics
        counted in bits or bytes (`size<=4MB`). Case of `w`, `a`, `c` does not matter; spaces are ignored.
        """
        if not isinstance(text, str) or not text.strip():
            raise BudgetError(f"budget string must be non-empty text such as 'w3a4&c12.2', found {brief(text)}")
        out: Budget | None = None
        for raw in text.split("&"):
            term = raw.strip()
            t = re.sub(r"^([wWcC])", lambda m: m.group(1).lower(), term)
            t = re.sub(r"^(w\d+)A", r"\1a", t)
            m = _TERM.match(t)
            if not m:
                raise BudgetError(f"budget {brief(text)}: cannot read term {brief(term)}; expected 'w<bits>a<bits>', "
                                       "'c<ratio>' or 'metric<=number[k|M|G|T|B|KB|MB|GB|KiB|MiB|GiB]'")
            if m["w"]:
                if len(m["w"]) > 3 or len(m["a"]) > 3:
                    raise BudgetError(f"budget {brief(text)}: bit-widths in {brief(term)} must be small integers "
                                      f"such as w3a4")
                b = cls.uniform(int(m["w"]), int(m["a"]))
            elif m["c"]:
                try:
                    ratio = float(m["c"])
                except ValueError:
                    raise BudgetError(f"budget {brief(text)}: bad compression ratio in {brief(term)}") from None
                try:
                    b = cls.compression(ratio)
                except BudgetError as e:
                    raise BudgetError(f"budget {brief(text)}: {e}") from None
            else:
                try:
                    num = float(m["num"])
                except ValueError:
                    raise BudgetError(f"budget {brief(text)}: bad number in {brief(term)}") from None
                unit = m["unit"]
                if not math.isfinite(num * _SI.get(unit, 1.0) * _BYTES.get(unit, 1.0)):
                    raise BudgetError(f"budget {brief(text)}: the limit in {brief(term)} is not a finite number")
                if unit in _SI:
                    b = cls(**{m["metric"]: num * _SI[unit]})
                elif unit in _BYTES:
                    b = cls._make({}, (), {m["metric"]: num * _BYTES[unit]})
                else:
                    raise BudgetError(f"budget {brief(text)}: unknown unit {unit!r} in {brief(term)}; use k, M, G, T "
                                           "or B, KB, MB, GB, KiB, MiB, GiB")
            out = b if out is None else out & b
        if out is None:  # unreachable: split() yields at least one term
            raise BudgetError(f"budget {brief(text)}: no terms")
        return out
