"""Atomic file writes: write beside the target, fsync, os.replace on success; on failure the old file stays."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ArgumentError

log = logging.getLogger(__name__)

__all__ = ["atomic_path", "atomic_paths", "atomic_write_text", "check_writable", "remove_stale_temps"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file `.{name}.XXXXXXXX.tmp` beside `path` for the body to write; renamed onto `path` on success.

    The body writes the temp path by any means (open, torch.save, onnx.save_model). When it returns, the file is
    fsync'd and os.replace'd onto `path`, so a reader sees the old file or the new one, never part of one. When it
    raises (KeyboardInterrupt included), the temp file is removed and `path` is untouched. The parent directory is
    created when missing; the new file's permissions follow the umask, like a file opened for writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve(path.parent, path.name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_paths(path: str | Path, *sidecars: str | Path) -> Iterator[tuple[Path, ...]]:
    """Temp paths for a file and its sidecars (same directory), written by the body under their final names.

    Yields one path per argument, inside a fresh temp directory `.{name}.XXXXXXXX.tmp` beside `path`, each with
    its target's file name, so that a writer which refers to a sidecar by a name relative to the main file (ONNX
    external data) writes the final name. On success every file is fsync'd and os.replace'd onto its target:
    sidecars first, `path` last. A sidecar the body did not write is removed from the directory (the group is the
    whole artefact: no stale sidecar survives beside the new file); `path` itself must be written. On any
    exception (KeyboardInterrupt included) the temp directory is removed and every target is untouched.
    """
    targets = [Path(p) for p in (path, *sidecars)]
    parent = targets[0].parent
    if any(t.parent != parent for t in targets) or len({t.name for t in targets}) != len(targets):
        raise ArgumentError(f"atomic_paths: expected distinct files in one directory, found "
                            f"{', '.join(map(str, targets))}")
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{targets[0].name}.", suffix=".tmp", dir=parent))
    temps = tuple(tmp_dir / t.name for t in targets)
    try:
        yield temps
        if not temps[0].is_file():
            raise FileNotFoundError(f"{targets[0]}: the writer did not create it (nothing was replaced)")
        written = [(tmp, t) for tmp, t in zip(temps, targets) if tmp.is_file()]
        for tmp, _ in written:
            _fsync(tmp)
        for tmp, target in reversed(written):  # the main file last: its sidecars are in place before it
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    for target in set(targets[1:]) - {t for _, t in written}:
        target.unlink(missing_ok=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    _fsync_dir(parent)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see atomic_path); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def check_writable(path: str | Path, what: str, *, directory: bool = False) -> Path:
    """`path` as a Path once it is clear that a file (or, with `directory`, a folder) can be written there.

    Checked before any long work, so that an output that cannot be written is refused at once, not after the
    work: the path must not be a folder (a file: a file), and its nearest existing ancestor must be a folder this
    process may write in (missing folders are created by the writer). ArgumentError naming `what` otherwise.
    """
    path = Path(path)
    kind = "folder" if directory else "file"
    if path.exists():
        if directory and not path.is_dir():
            raise ArgumentError(f"{what} {path} is a file, not a folder; give a folder (it is created when missing)")
        if not directory and path.is_dir():
            raise ArgumentError(f"{what} {path} is a folder; give the path of a file to write")
        target = path if directory else path.parent
        if not os.access(target, os.W_OK | os.X_OK):
            raise ArgumentError(f"{what} {path}: no permission to write in {target}")
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArgumentError(f"{what} {path}: cannot create this {kind}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArgumentError(f"{what} {path}: cannot create this {kind}: no permission to write in {ancestor}")
    return path


def remove_stale_temps(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove the temp files (and temp folders) that a writer killed mid-write left beside the artefacts `names`
    in `directory`: `.{name}.XXXXXXXX.tmp`, the names atomic_path and atomic_paths reserve. Returns what went."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    patterns = [re.compile(rf"^\.{re.escape(n)}\.[A-Za-z0-9_]{{8}}\.tmp$") for n in names]
    removed = []
    for p in directory.iterdir():
        if any(pat.match(p.name) for pat in patterns):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d stale temp file(s) of an interrupted write in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))
    return removed


def _reserve(directory: Path, name: str) -> Path:
    """Create an empty, unused `.{name}.XXXXXXXX.tmp` in `directory` (mode 0o666 less the umask)."""
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{directory}: no free temp name for {name} after 100 tries")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
