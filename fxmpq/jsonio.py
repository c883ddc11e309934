"""Reading the JSON artefacts (indicators, policies) from a path or from text, with errors that name the source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import FxmpqError

__all__ = ["read_json"]


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
