"""Policy: a frozen map from layer name to (weight bits, activation bits), with JSON round-trip and checks."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..capture.record import LayerRecord
from ..core.jsonio import dump_json, read_json
from ..errors import PolicyError, brief
from ..hardware.formats import format_name, format_of
from ..hardware.spec import FLOAT, FLOAT_BITS, HardwareSpec, Pair

if TYPE_CHECKING:
    from .analysis import Analysis

log = logging.getLogger(__name__)

__all__ = ["Policy"]

FORMAT = "fxmpq.policy/1"


Bits = tuple[int | None, int | None]


def _bits(b: int | None) -> int:
    return FLOAT_BITS if b is None else b


@dataclass(frozen=True, init=False)
class Policy(Mapping[str, Bits]):
    """Layer name -> (w_bits, a_bits); (w, None) is weight-only (float activations), (None, None) leaves a layer
    in float. Pinned layers may be left out: they run at their pins."""

    bits: Mapping[str, Bits]

    def __init__(self, bits: Mapping[str, Bits] | None = None):
        clean: dict[str, Bits] = {}
        for name, pair in (bits or {}).items():
            if not isinstance(name, str):
                raise PolicyError(f"policy keys must be layer names (strings), found {brief(name)}")
            try:
                w, a = pair
            except (TypeError, ValueError):
                raise PolicyError(f"policy entry {brief(name)} must be a (w_bits, a_bits) pair, found "
                                  f"{brief(pair)}") from None
            if (w, a) != FLOAT and not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= FLOAT_BITS
                                           for b in ((w, a) if a is not None else (w,))):
                raise PolicyError(f"policy entry {brief(name)} must hold integer bits 1..{FLOAT_BITS}, found "
                                  f"{brief(pair)} (or (None, None) for a layer left in float)")
            clean[name] = (w, a)
        object.__setattr__(self, "bits", MappingProxyType(clean))

    # Mapping protocol
    def __deepcopy__(self, memo: dict[int, Any]) -> Policy:
        return self  # an immutable value

    def __getitem__(self, name: str) -> Bits:
        return self.bits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.bits.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and dict(self.bits) == dict(other.bits)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {format_name(p)}" for k, p in list(self.bits.items())[:6])
        more = f", ... {len(self) - 6} more" if len(self) > 6 else ""
        return f"Policy({{{inner}{more}}})"

    @classmethod
    def uniform(cls, analysis: Analysis, w_bits: int, a_bits: int) -> Policy:
        """Every searchable layer at (w_bits, a_bits); pinned layers keep their pins."""
        hw = analysis.hardware
        if not hw.supports(w_bits, a_bits):
            raise PolicyError(f"uniform W{w_bits}A{a_bits} is not a pair hardware {hw.name!r} runs; "
                              f"supported pairs: {', '.join(f'W{w}A{a}' for w, a in hw.pairs)}")
        return cls({m.name: (m.pin_bits if m.pinned else (w_bits, a_bits)) for m in analysis.layers})

    def complete(self, analysis: Analysis) -> Policy:
        """This policy checked against `analysis`, with pinned layers filled in at their pins."""
        self.validate(analysis)
        return Policy({m.name: (m.pin_bits if m.pinned else self.bits[m.name]) for m in analysis.layers})

    def validate(self, analysis: Analysis) -> None:
        """Raise PolicyError listing unknown layers, missing searchable layers, unsupported or off-pin bits."""
        problems = policy_problems(self.bits, analysis.layers, analysis.hardware)
        if problems:
            raise PolicyError("policy does not fit the model: " + "; ".join(problems))

    def format_counts(self) -> dict[str, int]:
        """How many layers run in each format ("W4A8", "W4Afloat", "float", ...), by name."""
        return dict(sorted(Counter(format_name(p) for p in self.bits.values()).items()))

    def average_bits(self, analysis: Analysis, *, searchable_only: bool = True) -> tuple[float, float]:
        """Parameter-weighted mean weight bits and MAC-weighted mean activation bits (a float layer counts 32)."""
        layers = [m for m in analysis.layers if m.name in self.bits and (m.searchable or not searchable_only)]
        p = sum(m.params for m in layers) or 1
        mac = sum(m.macs for m in layers) or 1
        w = sum(_bits(self.bits[m.name][0]) * m.params for m in layers) / p
        a = sum(_bits(self.bits[m.name][1]) * m.macs for m in layers) / mac
        return w, a

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: {"format": ..., "layers": {name: {"w": bits, "a": bits}}} (null bits: float)."""
        return {"format": FORMAT, "layers": {n: {"w": w, "a": a} for n, (w, a) in self.bits.items()}}

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON text; also write it to `path` when given."""
        return dump_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, source: str | Path) -> Policy:
        """Read a policy from JSON text or from a file path."""
        data, where = read_json(source, PolicyError, "policy")
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise PolicyError(f'{where}: expected {{"format": "{FORMAT}", "layers": {{name: {{"w": .., "a": ..}}}}}}')
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise PolicyError(f"{where}: format {brief(fmt)} is not {FORMAT!r}; not an fxmpq policy file")
        bits = {}
        for name, entry in data["layers"].items():
            if not (isinstance(entry, dict) and set(entry) == {"w", "a"}):
                raise PolicyError(f'{where}: layers.{name[:60]}: expected {{"w": bits, "a": bits}}, found '
                                  f'{brief(entry)}')
            bits[name] = (entry["w"], entry["a"])
        try:
            return cls(bits)
        except PolicyError as e:
            raise PolicyError(f"{where}: {e}") from None


def policy_problems(bits: Mapping[str, Pair], layers: Sequence[LayerRecord], hw: HardwareSpec | None
                    ) -> list[str]:
    """Everything wrong with `bits` for `layers`: unknown layers, searchable layers without bits, formats the layer's
    kind cannot take or `hw` does not run (without `hw`: formats the layer was not priced in), pinned layers given
    other bits. The one policy check: Policy.validate and ApplyPolicyPass both call it."""
    known = {m.name: m for m in layers}
    problems = []
    unknown = [n for n in bits if n not in known]
    if unknown:
        problems.append(f"unknown layer(s): {', '.join(unknown)}")
    missing = [m.name for m in layers if m.searchable and m.name not in bits]
    if missing:
        problems.append(f"searchable layer(s) without bits: {', '.join(missing)}")
    for n, (w, a) in bits.items():
        if n in known:
            try:
                format_of(known[n].kind, w, a)  # the kind's own rule (weight-only: linear layers only)
            except PolicyError as e:
                problems.append(f"{n}: {e}")
    bad = [f"{n} {format_name((w, a))}" for n, (w, a) in bits.items() if n in known and known[n].searchable
           and (not hw.runs(known[n].kind, w, a) if hw is not None else (w, a) not in known[n].costs)]
    if bad and hw is not None:
        offers = ", ".join(f"W{w}A{a}" for w, a in hw.pairs)
        if hw.weight_only_bits:
            offers += f"; weight-only {', '.join(f'W{w}Afloat' for w in hw.weight_only_bits)} for linear layers"
        if hw.float_kinds:
            offers += f"; float for {', '.join(sorted(k.value for k in hw.float_kinds))} layers"
        where = "" if hw.path.endswith("(shipped)") else f" ({hw.path})"  # a user's file: which one
        problems.append(f"bits hardware {hw.name!r}{where} does not run: {', '.join(bad)} (supported pairs: {offers})")
    elif bad:
        problems.append(f"bits the layers were not priced in: {', '.join(bad)}")
    off_pin = [f"{n} W{w}A{a} (pinned at W{known[n].pin_bits[0]}A{known[n].pin_bits[1]})"
               for n, (w, a) in bits.items() if n in known and known[n].pinned and (w, a) != known[n].pin_bits]
    if off_pin:
        problems.append(f"pinned layer(s) given other bits: {', '.join(off_pin)}")
    return problems
