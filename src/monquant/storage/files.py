"""Atomic files: a reader sees the old file or the complete new one, never a partial write.

One writer for every file monquant produces (tensors, checkpoints, JSON, reports): a temporary file
in the same folder, fsync, rename, fsync of the folder. New files get ordinary permissions
(``rw-r--r--``, or the replaced file's own bits), not ``mkstemp``'s ``rw-------``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PathLike", "atomic_target", "atomic_write_bytes", "atomic_write_text"]

PathLike = str | os.PathLike[str]




def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entry table so a rename inside it survives a crash (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _target_mode(path: Path) -> int:
    """Permission bits for the new file: the old file's, or rw-r--r-- (mkstemp makes rw-------)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _target_mode(path))
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
