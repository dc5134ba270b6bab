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

from monquant.errors import ConfigError, MonquantError

__all__ = [
    "FolderLockedError",
    "PathLike",
    "atomic_target",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_file",
    "folder_lock",
]

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


def check_output_file(path: PathLike) -> Path:
    """Refuse, before any work, an output file path that cannot be written.

    A path naming a folder, a path under an existing file, or a folder that cannot be created or
    written gets a :class:`~monquant.errors.ConfigError` naming the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name for the output")
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"cannot write {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot write {path}: {p} is not writable")
            break
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    try:
        with atomic_target(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class FolderLockedError(MonquantError):
    """Another live process writes the same run or results folder."""


_HELD: dict[Path, int] = {}
LOCK_NAME = ".monquant.lock"


@contextlib.contextmanager
def folder_lock(folder: PathLike, what: str = "monquant") -> Iterator[Path]:
    """Hold ``folder`` exclusively while a run writes it (``<folder>/.monquant.lock``, pid inside).

    A second process asking for the same folder gets :class:`FolderLockedError` at once, before
    any work; a lock left by a process that no longer exists (killed, crashed) is stale and taken
    over, and the atomic writer's temporaries (``.<name>.*.tmp``) that its owner left are removed.
    Re-entrant within one process. Creating the folder and the lock file also proves, before
    any long work, that the location is writable (a clear error otherwise).
    """
    folder = Path(folder).resolve()
    if _HELD.get(folder):
        _HELD[folder] += 1
        try:
            yield folder
        finally:
            _HELD[folder] -= 1
        return
    path = folder / LOCK_NAME
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from exc
    stale = False
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None and _alive(owner):
                raise FolderLockedError(
                    f"{folder} is in use by another {what} run (pid {owner}); wait for it, or "
                    f"choose another output folder (a stale lock is {path})"
                ) from None
            path.unlink(missing_ok=True)  # stale: its owner is gone
            stale = True
            continue
        except OSError as exc:
            raise ConfigError(f"cannot write to {folder}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        break
    else:  # pragma: no cover - a third process won the race twice
        raise FolderLockedError(f"{folder} is in use by another {what} run")
    if stale:  # a killed owner may have left half-written temporaries of the atomic writer
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    _HELD[folder] = 1
    try:
        yield folder
    finally:
        _HELD.pop(folder, None)
        if _lock_owner(path) == os.getpid():
            path.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a run that wrote nothing leaves nothing behind


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
