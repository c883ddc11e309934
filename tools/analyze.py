"""Per-layer cost table of a model on a hardware description: `fxmpq analyze` under its design-card name.

    python tools/analyze.py resnet18 --input 3x224x224 --hardware bitops --uniform w4a4
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fxmpq.cli import analyze as _command
from fxmpq.cli.analyze import build_model, parse_input_size, parse_uniform, uncovered_parameters

__all__ = ["build_model", "main", "parse_input_size", "parse_uniform", "uncovered_parameters"]


def main(argv: Sequence[str] | None = None) -> int:
    return _command.main(argv, prog="analyze.py", label="analyze.py")


if __name__ == "__main__":
    sys.exit(main())
