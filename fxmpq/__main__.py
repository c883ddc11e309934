"""`python -m fxmpq`: the `fxmpq` command (fxmpq.cli.main), e.g. `python -m fxmpq quantize --help`."""

from __future__ import annotations

import sys

from fxmpq.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
