"""Helpers the command-line tools share: parsing option values into what the library takes."""

from __future__ import annotations

import re

from .errors import ArgumentError

__all__ = ["parse_shape"]


def parse_shape(text: str, *, option: str = "--input", batch: bool = False) -> tuple[int, ...]:
    """"3x224x224" -> (3, 224, 224); ArgumentError naming `option` for anything but positive sizes joined by x.

    `batch` says the shape includes the batch dimension ("1x3x224x224"); it changes only the error's example.
    """
    t = text.strip().lower()
    if not re.fullmatch(r"[0-9]+(x[0-9]+)*", t):
        shape = ("the input shape with the batch first as NxCxHxW (e.g. 1x3x224x224)" if batch else
                 "the per-sample shape as CxHxW (e.g. 3x224x224) or CxL (e.g. 4x32)")
        raise ArgumentError(f"{option} {text!r}: expected {shape}")
    dims = tuple(int(d) for d in t.split("x"))
    if any(d <= 0 for d in dims):
        raise ArgumentError(f"{option} {text!r}: every dimension must be positive")
    return dims
