"""Atomic checkpoints: plain tensors plus JSON metadata, saved with torch.save and loaded with weights_only=True."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "join_state", "load_checkpoint", "load_error_reason", "load_tensors", "save_checkpoint", "split_state"]

FORMAT = "fxmpq.checkpoint/1"


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write `tensors` (name -> tensor) and JSON-serialisable `meta` to `path` atomically (fxmpq.core.atomic)."""
    path = Path(path)
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: checkpoint tensors must be torch.Tensors; not tensors: {', '.join(bad[:5])}")
    try:
        meta_text = json.dumps(dict(meta))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not JSON-serialisable: {e}") from None
    payload = {"format": FORMAT, "meta": meta_text,
               "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    log.debug("saved checkpoint %s (%d tensors)", path, len(tensors))
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (tensors, meta) from a checkpoint written by save_checkpoint; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    payload = load_tensors(path, "not a readable fxmpq checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an fxmpq checkpoint (expected format {FORMAT!r}, found {found!r})")
    tensors, meta_text = payload.get("tensors"), payload.get("meta")
    if not isinstance(tensors, dict) or not isinstance(meta_text, str):
        raise CheckpointError(f"{path}: malformed checkpoint (expected keys 'tensors' (dict) and 'meta' (JSON))")
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON ({e.msg})") from None
    return tensors, meta


def load_tensors(path: str | Path, what: str = "not a loadable tensors file", where: str | None = None) -> Any:
    """torch.load(path, weights_only=True) on the CPU, quietly: CheckpointError "<where>: <what> (<reason>)" when
    it fails (`where` defaults to the path), the reason without torch's unsafe advice (load_error_reason) and no
    warning printed before it."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before the one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on corrupt or foreign files
        raise CheckpointError(f"{where or path}: {what} ({load_error_reason(e)})") from None


_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|trust|arbitrary code|pickle|file an issue|documentation of "
                            r"torch\.load|can still be loaded|two options", re.IGNORECASE)


def load_error_reason(e: BaseException) -> str:
    """What was wrong with a file torch.load(weights_only=True) refused, without torch's advice to load it with
    weights_only=False or to allow-list its classes: that would run whatever code the file holds, and a file that
    fxmpq cannot read safely is not one to unpickle. Every message that relays a torch.load error goes through here.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "WeightsUnpickler error:" in text:  # the part after it says what the file holds
        text = text.split("WeightsUnpickler error:", 1)[1]
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds a pickled Python object ({found[1]}), not only tensors; fxmpq reads tensors only and "
                    f"never runs code from a file")
        operand = re.search(r"Unsupported operand \d+", text)
        if operand:
            return f"not a tensors-only torch file ({operand[0]}); fxmpq loads tensors only"
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+|\n+", text) if x.strip()]
    kept = [x.rstrip(".") for x in sentences if not _UNSAFE_ADVICE.search(x)]
    reason = kept[0] if kept else "not a tensors-only torch file"
    return f"{type(e).__name__}: {reason}" if kept else reason


def split_state(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts/lists of tensors and plain values) into flat tensors and a JSON skeleton.

    Each tensor is replaced in the skeleton by {"__tensor__": key}; `join_state` reverses it.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, Mapping):
            return {"__dict__": [[_key(k), walk(v, f"{key}/{k}")] for k, v in x.items()]}
        if isinstance(x, list | tuple):
            return [walk(v, f"{key}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise CheckpointError(f"cannot store {type(x).__name__} at {key} in a checkpoint (tensors and JSON only)")

    return tensors, walk(state, prefix)


def _key(k: Any) -> Any:
    if isinstance(k, bool | int | str):
        return k
    raise CheckpointError(f"checkpoint state keys must be str or int, found {type(k).__name__} {k!r}")


def join_state(skeleton: Any, tensors: Mapping[str, torch.Tensor], where: str = "<checkpoint>") -> Any:
    """Rebuild the nested state from a `split_state` skeleton and its tensors."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict) and "__tensor__" in x:
            try:
                return tensors[x["__tensor__"]]
            except KeyError:
                raise CheckpointError(f"{where}: missing tensor {x['__tensor__']!r}") from None
        if isinstance(x, dict) and "__dict__" in x:
            return {k: walk(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)
