"""JSON artefacts (indicators, policies, search results): read errors name the source, writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FxmpqError, first_line
from .atomic import atomic_write_text

__all__ = ["dump_json", "read_json"]

MAX_DEPTH = 64  # no fxmpq artefact nests deeper than a few levels; deeper text is refused before it is parsed


def read_json(source: str | Path, error: type[FxmpqError], what: str) -> tuple[Any, str]:
    """(parsed JSON, where it came from) for a file path or JSON text; `error` names the file or the defect.

    The one reader of fxmpq's JSON files: every way a file can be unreadable (missing, a directory, not UTF-8,
    not JSON, numbers with more digits than Python converts, arrays nested past MAX_DEPTH) raises `error` naming
    the file and the defect, never the json module's exception.
    """
    where, text = "<text>", str(source)
    if isinstance(source, Path) or not text.lstrip().startswith("{"):
        where = text
        try:
            raw = Path(source).read_bytes()
        except OSError as e:
            raise error(f"cannot read {what} file {where}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); expected {what} as JSON "
                        f"text") from None
    depth = _max_depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{where}: arrays or objects nested more than {MAX_DEPTH} levels deep; not {what} JSON")
    try:
        return json.loads(text), where
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError, OverflowError) as e:  # an integer of more than 4300 digits, ...
        reason = ("a number has more digits than Python converts (4300)" if "digits" in str(e)
                  else first_line(e) or type(e).__name__)
        raise error(f"{where}: not readable as {what} JSON ({reason})") from None


def _max_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a cheap scan, so json.loads never recurses too far)."""
    depth = best = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best = depth
                if best > MAX_DEPTH:
                    return best
        elif ch in "]}":
            depth -= 1
    return best


def dump_json(obj: Any, path: str | Path | None = None) -> str:
    """`obj` as indented JSON text; also written to `path` when given, atomically (fxmpq.core.atomic)."""
    text = json.dumps(obj, indent=1)
    if path is not None:
        atomic_write_text(path, text + "\n")
    return text
