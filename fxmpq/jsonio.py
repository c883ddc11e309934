"""Reading and writing the JSON artefacts (indicators, policies, search results): reads name the source on error,
writes are atomic so that an interrupted run never leaves a half-written artefact for a resume to trip on."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
    """`obj` as indented JSON text; also written to `path` when given, atomically (temp file + rename)."""
    text = json.dumps(obj, indent=1)
    if path is not None:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return text
