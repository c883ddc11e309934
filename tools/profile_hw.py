"""Measure a model's layers in ONNX Runtime and write a hardware file: `fxmpq profile` under its design-card name.

    python tools/profile_hw.py MODEL --input CxHxW [--batch B] [--threads N] [--repeats R] --out FILE.toml
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fxmpq.cli import profile as _command


def main(argv: Sequence[str] | None = None) -> int:
    return _command.main(argv, prog="profile_hw.py", label=None)


if __name__ == "__main__":
    sys.exit(main())
