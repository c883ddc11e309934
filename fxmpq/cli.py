"""Helpers the command-line tools share: parsing option values into what the library takes, and one-line errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from .atomic import check_writable
from .errors import ArgumentError

__all__ = ["check_count", "check_output", "fail", "one_line", "parse_shape"]


def parse_shape(text: str, *, option: str = "--input", batch: bool = False) -> tuple[int, ...]:
    """"3x224x224" -> (3, 224, 224); ArgumentError naming `option` for anything but positive sizes joined by x.

    `batch` says the shape includes the batch dimension ("1x3x224x224"); it changes only the error's example.
    """
    t = text.strip().lower()
    if not re.fullmatch(r"[0-9]{1,9}(x[0-9]{1,9}){0,7}", t):
        shape = ("the input shape with the batch first as NxCxHxW (e.g. 1x3x224x224)" if batch else
                 "the per-sample shape as CxHxW (e.g. 3x224x224) or CxL (e.g. 4x32)")
        raise ArgumentError(f"{option} {text[:60]!r}: expected {shape}")
    dims = tuple(int(d) for d in t.split("x"))
    if any(d <= 0 for d in dims):
        raise ArgumentError(f"{option} {text!r}: every dimension must be positive")
    return dims


def check_count(value: Any, option: str, *, least: int = 1) -> Any:
    """`value` unchanged when it is None or an integer >= `least`; ArgumentError naming `option` otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise ArgumentError(f"{option} {value}: expected an integer >= {least}")
    return value


def check_output(path: str | Path | None, option: str, *, directory: bool = False) -> Path | None:
    """The output `path` of `option` once it is clear it can be written (fxmpq.atomic.check_writable), before any
    work: an output that cannot be written is refused at once, not after the work that produces it."""
    return None if path is None else check_writable(path, option, directory=directory)


def one_line(error: BaseException) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split())


def fail(error: BaseException, code: int, *, prog: str | None = None) -> int:
    """Print "[prog: ]error: <message>" on one line to stderr (never a traceback); returns the exit status `code`."""
    print(f"{prog + ': ' if prog else ''}error: {one_line(error)}", file=sys.stderr)
    return code
