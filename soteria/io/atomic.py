"""Atomic file output: a reader sees the old state or the complete new one, never a half-written one.

- :func:`atomic_directory`: build a directory under a temporary name beside the target, fsync
  it, then rename it into place. Any exception (``KeyboardInterrupt`` included) removes the
  temporary directory and leaves the target as it was.
- :func:`atomic_file`: the same for one file (``os.replace``); :func:`atomic_write_bytes` /
  :func:`atomic_write_text` write given contents through it.

The temporary names start with ``.`` and the target's name (``.out.tmp-1a2b3c4d``), so a
process killed with SIGKILL leaves at worst a hidden, clearly named leftover, never a
target that looks complete. New files and directories get the usual umask permissions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_target",
    "check_writable",
    "fsync_tree",
]


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file and directory under ``root`` (``root`` included)."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False, ours: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``target`` when the block succeeds.

    ``target`` must not exist unless ``overwrite=True`` (then an existing directory is replaced:
    it is moved aside, the new one renamed in, the old one deleted; the only moment neither
    exists is between two renames), and only an empty directory or one holding the file
    ``ours`` (what marks an output of the caller's kind) is ever replaced (:func:`check_target`).
    On any exception the temporary directory is deleted and the exception propagates.
    Leftovers of runs killed before they could clean up (``.name.tmp-*``) are reported with a
    warning, never deleted: another process may be writing them.
    """
    target = Path(os.path.abspath(target))
    check_target(target, overwrite, ours=ours)
    stale = sorted(p.name for p in target.parent.glob(f".{target.name}.tmp-*")) if target.parent.is_dir() else []
    if stale:
        warnings.warn(
            f"{target.parent} holds {len(stale)} temporary folder(s) of interrupted runs writing {target.name} "
            f"({', '.join(stale[:3])}); remove them if no other run is writing there",
            stacklevel=3,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        check_target(target, overwrite, ours=ours)  # again: something may have appeared meanwhile
        if os.path.lexists(target):
            old = _sibling(target, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(target: Path, overwrite: bool, *, ours: str | None = None) -> None:
    """FileExistsError unless ``target`` is free, or ``overwrite`` and it is a directory that is
    empty or holds ``ours`` (so a folder of someone else's files is never replaced)."""
    target = Path(target)
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; choose a new directory, or allow replacing it "
                              "(overwrite=True, --overwrite)")  # fmt: skip
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; only directories are replaced")
    names = sorted(p.name for p in target.iterdir())
    if names and (ours is None or ours not in names):
        what = f"it has no {ours}" if ours else "it is not empty"
        raise FileExistsError(f"{target} holds files this did not write ({', '.join(names[:4])}; {what}); "
                              "choose a new directory, or remove it yourself")  # fmt: skip


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """A folder files will be written into: an existing one must be a writable directory, a new one
    must have a writable ancestor. ``what`` names it in the error. Checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file; give a folder")
    probe = path if path.is_dir() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not probe.is_dir():  # root's os.access passes an executable file
        raise NotADirectoryError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: cannot write to {probe}")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    r"""Yield a temporary sibling path to write; on success it is fsynced and ``os.replace``\ d
    onto ``path``, on any exception deleted (``path`` is left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself durable
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
