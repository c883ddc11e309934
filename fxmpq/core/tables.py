"""Plain-text tables: the one renderer behind every printed table (analysis, indicators, search results)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render"]


def render(header: Sequence[object], rows: Sequence[Sequence[object]], *, left: int = 1) -> str:
    """Columns padded to their widest cell, the first `left` aligned left and the rest right, a rule under the header."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
