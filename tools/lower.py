"""A quantized checkpoint written by fxmpq to a checked QDQ ONNX model: `fxmpq lower` under its design-card name.

    python tools/lower.py CHECKPOINT_OR_WORKDIR --out model.onnx [--storage int8|packed] [--no-measure]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fxmpq.cli import lower as _command


def main(argv: Sequence[str] | None = None) -> int:
    return _command.main(argv, prog="lower.py", label=None)


if __name__ == "__main__":
    sys.exit(main())
