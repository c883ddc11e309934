"""The format rule: what a layer runs as on a target, decided in one place for the cost, apply and lowering passes.

A policy entry (w, a) names a format: integer bits are a `WxA` QDQ layer (an integer kernel where the runtime fuses
it), (w, None) is weight-only (a linear layer with w-bit weights and float activations: ONNX Runtime's
MatMulNBits), (None, None) leaves the layer in float. AnnotateCost prices every format `HardwareSpec.formats(kind)` offers,
ApplyPolicy simulates the chosen one, LowerToQDQ emits it; each asks `format_of`.
"""

from __future__ import annotations

import enum

from ..errors import PolicyError
from .spec import FLOAT, MAX_ACT_BITS, HardwareSpec, LayerKind, format_name

__all__ = ["FLOAT", "INTEGER_KERNEL_BITS", "Format", "act_container_bits", "format_name", "format_of",
           "integer_kernel"]

# ONNX Runtime's CPU provider fuses Q/DQ around a conv or matmul into an integer kernel (QLinearConv, QLinearMatMul,
# QLinearAdd) only when every tensor is 8-bit: its QDQ selectors register Conv, MatMul and Add with 16-bit support
# switched off (onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc).
# A layer with 16-bit input or output activations runs as DequantizeLinear -> float op -> QuantizeLinear.
INTEGER_KERNEL_BITS = 8


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


def act_container_bits(a: int) -> int:
    """The unsigned container an a-bit activation is stored in by Q/DQ: uint8 up to 8 bits, uint16 up to 16."""
    if not 1 <= a <= MAX_ACT_BITS:
        raise PolicyError(f"{a}-bit activations: Q/DQ stores activations in uint8 or uint16, so 1..{MAX_ACT_BITS} bits")
    return 8 if a <= 8 else 16


def integer_kernel(w: int | None, a: int | None, out_bits: int | None = None) -> bool:
    """Whether ONNX Runtime's CPU provider runs a layer with w-bit weights, a-bit inputs and its output read at
    `out_bits` (None: not requantized) as an integer kernel, rather than DequantizeLinear -> float op."""
    return (w is not None and a is not None and w <= INTEGER_KERNEL_BITS and a <= INTEGER_KERNEL_BITS
            and (out_bits is None or out_bits <= INTEGER_KERNEL_BITS))
