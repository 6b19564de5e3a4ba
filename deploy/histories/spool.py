"""A history file's lines copied into one unlinked scratch file (the server's `--scratch-dir`), read back by offset.

Kept as text, unread users' lines cost about the file's size in anonymous memory; a spool keeps per line only
where it is (16 bytes) and reads it back with os.pread when the user is first read or the store is written.
"""

from __future__ import annotations

import errno
import os
import uuid
import weakref
from array import array
from pathlib import Path

from deploy.histories.records import HistoryError
from tapper.scratch import ScratchDirError


class HistorySpoolError(ScratchDirError):
    """The spool dir cannot hold a history file's lines (not creatable, not writable, a network filesystem, full)."""


# Bytes buffered per write while a file is spooled (one write syscall per MiB, not per line).
_SPOOL_BUFFER = 1 << 20


class _Spool:
    """The lines of one history file, copied into one unlinked scratch file; line i is read back with os.pread.

    Per line it keeps 16 bytes (its end offset and its line number in the source file, in arrays) instead of
    the line's text. The file is unlinked right after it is created, so only the open descriptor keeps it: the
    descriptor is closed (and the disk space freed) when the last _Unread referring to this spool is gone.
    Written once by HistoryStore.read, then only read (os.pread takes no file position, so threads may share it)."""

    __slots__ = ("fd", "directory", "source", "ends", "linenos", "_pending", "__weakref__")

    def __init__(self, directory: Path, source: str):
        path = directory / f"tapper-histories-{uuid.uuid4().hex}.spool"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as err:
            raise HistorySpoolError(
                f"history spool dir {directory}: cannot create a spool file for {source} ({err.strerror or err})"
            ) from err
        try:
            # The name is not needed any more: the descriptor keeps the file, and a crash leaves nothing behind.
            os.unlink(path)
        except OSError:
            os.close(fd)
            raise
        self.fd, self.directory, self.source = fd, directory, source
        weakref.finalize(self, os.close, fd)
        self.ends = array("q", [0])  # line i is bytes [ends[i], ends[i + 1]) of the spool
        self.linenos = array("q")  # line i's line number in the source file, for errors
        # Our own write buffer rather than a file object: nothing may flush to the descriptor after it is closed.
        self._pending = bytearray()

    def add(self, data: bytes, lineno: int) -> int:
        """Append one line (without its line end); returns its index."""
        self._pending += data
        if len(self._pending) >= _SPOOL_BUFFER:
            self._flush()
        self.ends.append(self.ends[-1] + len(data))
        self.linenos.append(lineno)
        return len(self.linenos) - 1

    def finish(self) -> None:
        """Write what add() buffered; the spool is read-only from here on."""
        self._flush()

    def _flush(self) -> None:
        try:
            with memoryview(self._pending) as pending:
                done = 0
                while done < len(pending):  # os.write may write less than it was given
                    done += os.write(self.fd, pending[done:])
        except OSError as err:
            raise self._write_error(err) from err
        self._pending.clear()

    def _write_error(self, err: OSError) -> HistorySpoolError:
        hint = " (disk full)" if err.errno == errno.ENOSPC else ""
        return HistorySpoolError(
            f"history spool dir {self.directory}: cannot copy {self.source} into a spool file "
            f"({err.strerror or err}){hint}"
        )

    def line(self, index: int) -> str:
        return self.read(self.ends[index], self.ends[index + 1], index).decode("utf-8")

    def read(self, start: int, end: int, index: int) -> bytes:
        """Bytes [start, end) of the spool (`index`: the line they start with, for the error)."""
        data = os.pread(self.fd, end - start, start)
        while len(data) < end - start:  # a regular file reads short only at its end; loop rather than assume
            more = os.pread(self.fd, end - start - len(data), start + len(data))
            if not more:
                raise HistoryError(f"{self.source} line {self.linenos[index]}: its spooled copy is truncated")
            data += more
        return data


# Bytes read at once when a whole store is written: its unread users' lines follow each other in the spool
# (stores keep the file's order), so one pread serves hundreds of lines instead of one syscall per user.
_SPOOL_READ_BLOCK = 1 << 22


class _BlockReader:
    """The last block read from a spool, for one pass over a store (HistoryStore.lines); not shared by threads."""

    __slots__ = ("spool", "start", "data")

    def __init__(self) -> None:
        self.spool, self.start, self.data = None, 0, b""

    def line(self, spool: _Spool, index: int) -> str:
        start, end = spool.ends[index], spool.ends[index + 1]
        if spool is not self.spool or start < self.start or end > self.start + len(self.data):
            # A block from this line on (the line whole, even when it is longer than a block).
            block_end = max(end, min(spool.ends[-1], start + _SPOOL_READ_BLOCK))
            self.spool, self.start, self.data = spool, start, spool.read(start, block_end, index)
        return self.data[start - self.start : end - self.start].decode("utf-8")
