"""The optimal bit-width policy (ILP, HiGHS): `fxmpq search` under its design-card name.

    python tools/search.py --indicators tests/data/limpq_resnet50_indicators.json --model resnet50 \
        --input 3x224x224 --hardware bitops --budget "w3a4&c12.2" --out policy.json --plot bits.png
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fxmpq.cli import search as _command


def main(argv: Sequence[str] | None = None) -> int:
    return _command.main(argv, prog="search.py", label=None)


if __name__ == "__main__":
    sys.exit(main())
