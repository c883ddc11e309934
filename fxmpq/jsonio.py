"""JSON artefacts (indicators, policies, search results): read errors name the source, writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import FxmpqError

__all__ = ["dump_json", "read_json"]


def read_json(source: str | Path, error: type[FxmpqError], what: str) -> tuple[Any, str]:
    """(parsed JSON, where it came from) for a file path or JSON text; `error` names the file or the defect."""
    where, text = "<text>", str(source)
    if isinstance(source, Path) or not text.lstrip().startswith("{"):
        where = text
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise error(f"cannot read {what} file {where}: {e.strerror}") from None
    try:
        return json.loads(text), where
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None


def dump_json(obj: Any, path: str | Path | None = None) -> str:
    """`obj` as indented JSON text; also written to `path` when given, atomically (fxmpq.atomic)."""
    text = json.dumps(obj, indent=1)
    if path is not None:
        atomic_write_text(path, text + "\n")
    return text
