"""Joint indicator training, on one process or many (torchrun, DDP): `fxmpq train-indicators` under its
design-card name.

    python tools/train_indicators.py small_resnet --dataset fashion-mnist --epochs 1 --out runs/ind
    torchrun --nproc_per_node=4 tools/train_indicators.py resnet18 --dataset mypkg.data:train_set --input 3x32x32 --out runs/ind
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fxmpq.cli import train_indicators as _command
from fxmpq.cli.data import load_weights, parse_bits

__all__ = ["load_weights", "main", "parse_bits"]


def main(argv: Sequence[str] | None = None) -> int:
    return _command.main(argv, prog="train_indicators.py", label="train_indicators.py")


if __name__ == "__main__":
    sys.exit(main())
