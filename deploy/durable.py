"""Durable writes for the live state: a file is there whole or absent, *and* still there after a power loss.

A rename alone (tapper.atomic) is atomic but not durable: after a crash of the machine (not only of the process)
the rename may be lost, or the new name may point at a file whose data never reached the disk. What a feedback
acknowledges must survive that, so the state directory's writes go through here:

    write to a temporary name in the same directory -> fsync the file -> rename -> fsync the directory

(POSIX: a rename is made durable by fsync of the directory that holds it.) A directory tree written aside and
renamed into place (a snapshot generation) gets every file and directory fsynced before the rename.

Cost: two fsyncs per journal entry. `bench/serving.py` reports the feedback latency this includes; on the
development machine's disk an fsync of a small file takes about a millisecond, on network volumes several.

Errors keep their errno, so callers can tell a full disk (ENOSPC, EDQUOT) from anything else (deploy.errors
answers those with 507).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

# A full disk or an exhausted quota: the write did not happen, nothing else is wrong.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def is_no_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE


def fsync_dir(directory: str | Path) -> None:
    """Make the entries of `directory` (creations, renames, removals) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: str | Path, write: Callable[[str], None], mode: int = 0o644) -> Path:
    """Call `write(tmp)` for a temporary file next to `path`, fsync it, rename it onto `path`, fsync the directory.

    On any error the temporary file is removed and `path` is untouched (the previous file, or none)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def durable_write_bytes(path: str | Path, data: bytes) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return durable_write(path, _write)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (files first, then directories bottom-up), before the tree is
    renamed into place: the rename then publishes data that is on the disk."""
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)
