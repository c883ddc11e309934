"""The installed `fxmpq` command (fxmpq.cli.main) and the helpers its subcommands share: parsing option values into
what the library takes, one-line errors. One module per subcommand: analyze, profile, train_indicators, search,
finetune, lower, quantize, report; `data` holds the dataset, bits and weights options several of them take."""

from __future__ import annotations

import argparse
import functools
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.atomic import check_writable
from ..errors import ArgumentError

__all__ = ["Parser", "check_count", "check_output", "fail", "held_warnings", "one_line", "parse_shape"]


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
    """The output `path` of `option` once it is clear it can be written (fxmpq.core.atomic.check_writable), before any
    work: an output that cannot be written is refused at once, not after the work that produces it."""
    return None if path is None else check_writable(path, option, directory=directory)


def one_line(error: BaseException) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split())


def fail(error: BaseException, code: int, *, prog: str | None = None) -> int:
    """Print "[prog: ]error: <message>" on one line to stderr (never a traceback); returns the exit status `code`."""
    print(f"{prog + ': ' if prog else ''}error: {one_line(error)}", file=sys.stderr)
    return code


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr ("<prog>: error: <message> (see <prog> --help)", exit 2)
    instead of the usage block followed by the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def held_warnings(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a subcommand's `main`: the warnings libraries raise while it runs (torch, torchvision, onnx, on a
    foreign checkpoint or model, say) are held back. A run that fails prints its one error line alone; one that
    succeeds (exit status 0, --help included) shows them when it is done."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        code: Any = 1
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                code = main(*args, **kwargs)
        except SystemExit as e:  # argparse: --help (0) or a bad option (2)
            code = e.code or 0
            raise
        finally:
            if code == 0:
                for w in caught:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return code

    return run
