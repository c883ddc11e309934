"""The format rule: what a layer runs as on a target, decided in one place for the cost, apply and lowering passes.

A policy entry (w, a) names a format: integer bits are a `WxA` QDQ layer (an integer kernel where the runtime fuses
it), (w, None) is weight-only (a linear layer with w-bit weights and float activations: ONNX Runtime's
MatMulNBits), (None, None) leaves the layer in float. AnnotateCost prices every format `HardwareSpec.formats(kind)` offers,
ApplyPolicy simulates the chosen one, LowerToQDQ emits it; each asks `format_of`.
"""

from __future__ import annotations

import enum

from .errors import PolicyError
from .hardware import FLOAT, HardwareSpec, LayerKind, format_name

__all__ = ["FLOAT", "Format", "format_name", "format_of"]


class Format(enum.StrEnum):
    """The ways a layer can run."""

    FLOAT = "float"  # the float op, no quantizers around it
    INTEGER = "integer"  # w-bit weights, a-bit input activations: QDQ around the op
    WEIGHT_ONLY = "weight_only"  # w-bit weights, float activations: a linear layer as MatMulNBits


def format_of(kind: LayerKind, w: int | None, a: int | None, hardware: HardwareSpec | None = None) -> Format:
    """The format (w, a) names for a layer of `kind`; PolicyError when `hardware` (if given) does not offer it."""
    if (w, a) == FLOAT:
        fmt = Format.FLOAT
    elif isinstance(w, int) and isinstance(a, int):
        fmt = Format.INTEGER
    elif isinstance(w, int) and a is None:
        if kind != LayerKind.LINEAR:
            raise PolicyError(f"{format_name((w, a))} (weight-only) is a format of linear layers only, not of a "
                              f"{kind.value} layer")
        fmt = Format.WEIGHT_ONLY
    else:
        raise PolicyError(f"{format_name((w, a))}: a layer is either in float (None, None), weight-only (w, None) or "
                          f"has integer weight and activation bits")
    if hardware is not None and not hardware.runs(kind, w, a):
        offered = ", ".join(format_name(p) for p in hardware.formats(kind))
        raise PolicyError(f"hardware {hardware.name!r} ({hardware.path}) does not run a {kind.value} layer as "
                          f"{format_name((w, a))}; it offers {offered}")
    return fmt
