"""Users' history stores as the serving stack keeps them: LaMP profile items on disk, Records in use.

A bundle and a snapshot hold every user's records in `histories.jsonl`, one user per line:

    {"user":"<user id>","records":[<LaMP profile items {id, date?, <task fields>}>]}

A server reads the whole file at start, on reload and on adopting a snapshot, but a request touches one user.
So `HistoryStore` keeps each user's line as the text it read and parses and converts it into Records the first
time that user is read; writing a store back passes the unread users' lines through untouched. Loading costs
one pass over the lines and the memory of the file's text (at 100,000 users with 10 records each, parsing
every line up front took 3.6 s and about 4x the file's size in Python objects).

Older bundles and snapshots hold `histories.json` ({user_id: [items]}, one JSON document); they still load
(the whole document is parsed, then each user converted when first read). Writers only write JSON lines.

The price of reading lazily is when a malformed item is found: a hand-edited file with a bad record fails the
first request for that user (HistoryError naming the file, line, user, record and field) instead of the
server's start. Files tapper writes come from Records, which are valid by construction. What load itself
checks: every line names its user (a line that does not start the way tapper writes it is parsed whole and
checked then), and no user appears twice.

Kept as text, the unread lines still cost about the file's size in anonymous memory (1.7 GB at 1,000,000 users
with 10 records each). With a spool dir (the server's scratch dir, `--scratch-dir`), `HistoryStore.read` copies
the lines into one scratch file there instead and keeps per user only where its line is; the line is read back
(os.pread) when the user is first read or the store is written. The spool file is unlinked as soon as it is
open, like the paged user table's (tapper.model.paged_table): a crash leaves nothing behind, and its disk space
is freed when the last store that shares its unread users is gone. Its pages are page cache, which the kernel
writes back and reclaims under pressure, not anonymous memory.
"""
from __future__ import annotations

import errno
import json
import os
import uuid
import weakref
from array import array
from json.decoder import scanstring
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, MutableMapping, Sequence

from tapper.atomic import atomic_write
from tapper.data.chronology import parse_lamp_date, sort_chronologically
from tapper.data.lamp_io import record_to_json
from tapper.data.types import Record
from tapper.scratch import ScratchDirError, prepare_scratch_dir


HISTORIES_FILE = "histories.jsonl"
LEGACY_HISTORIES_FILE = "histories.json"  # written before JSON lines; read, never written
_LINE_START = '{"user":'
_RECORDS_KEY = ',"records":'


class HistoryError(ValueError):
    """A stored history is malformed. Names the file (and line), user, record and field."""


def record_from_json(item: Mapping[str, Any], where: str = "record") -> Record:
    if not isinstance(item, Mapping):
        raise HistoryError(f"{where}: expected an object (a LaMP profile item), got {type(item).__name__}")
    if "id" not in item:
        raise HistoryError(f"{where}: missing 'id'")
    raw = item.get("date")
    try:
        date = parse_lamp_date(raw)
    except ValueError as err:
        raise HistoryError(f"{where}, field 'date': {err}") from None
    fields = {k: str(v) for k, v in item.items() if k not in ("id", "date") and v is not None}
    return Record(id=str(item["id"]), fields=fields, date=date, raw_date=None if raw is None else str(raw))


def _records_from_json(user: str, items: list, where: str) -> list[Record]:
    return [record_from_json(r, f"{where}, user {user!r} record [{i}]") for i, r in enumerate(items)]


def histories_to_json(histories: Mapping[str, Sequence[Record]]) -> dict[str, list[dict]]:
    if isinstance(histories, HistoryStore):
        return histories.to_json()
    return {str(u): [record_to_json(r) for r in recs] for u, recs in histories.items()}


def _checked_top_level(obj: Any, where: str) -> dict[str, list]:
    if not isinstance(obj, dict):
        raise HistoryError(f"{where}: expected an object {{user_id: [records]}}")
    for user, items in obj.items():
        if not isinstance(items, list):
            raise HistoryError(f"{where}, user {user!r}: expected a list of records, got {type(items).__name__}")
    return {str(u): items for u, items in obj.items()}


def histories_from_json(obj: Any, where: str) -> dict[str, list[Record]]:
    """Every record converted now (for small stores, e.g. one feedback's records)."""
    return {u: _records_from_json(u, items, where) for u, items in _checked_top_level(obj, where).items()}


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
            raise HistorySpoolError(f"history spool dir {directory}: cannot create a spool file for {source} "
                                    f"({err.strerror or err})") from err
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
        return HistorySpoolError(f"history spool dir {self.directory}: cannot copy {self.source} into a spool file "
                                 f"({err.strerror or err}){hint}")

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
        return self.data[start - self.start: end - self.start].decode("utf-8")


class _Unread:
    """A user's stored history, not converted yet (never modified, so stores may share it).

    Either `line` (the user's line of a JSON-lines file, as read: parsed only when the user is read), `spool`
    and `index` (the same line, kept in a spool file instead of memory), or `parsed` (the user's items, from a
    legacy one-document file or a line not in tapper's shape). `source` names the file (one string shared by all
    its users) and `lineno` the line, for errors; `chronological`: sort the records when they are converted
    (what merge_histories promises)."""

    __slots__ = ("user", "source", "_lineno", "line", "parsed", "spool", "index", "chronological")

    def __init__(self, user: str, source: str, lineno: int | None = None, *, line: str | None = None,
                 parsed: list | None = None, spool: _Spool | None = None, index: int = -1, chronological: bool = False):
        self.user, self.source, self._lineno, self.chronological = user, source, lineno, chronological
        self.line, self.parsed, self.spool, self.index = line, parsed, spool, index

    @property
    def lineno(self) -> int | None:
        # A spooled line's number lives in the spool's array (8 bytes, not an int object per user).
        return self.spool.linenos[self.index] if self.spool is not None else self._lineno

    @property
    def where(self) -> str:
        lineno = self.lineno
        return self.source if lineno is None else f"{self.source} line {lineno}"

    def text(self, reader: "_BlockReader | None" = None) -> str | None:
        """The user's line as read (from the spool when spooled, through `reader` if given); None for parsed items."""
        if self.spool is None:
            return self.line
        return reader.line(self.spool, self.index) if reader is not None else self.spool.line(self.index)

    def items(self) -> list:
        if self.parsed is not None:
            return self.parsed
        try:
            obj = json.loads(self.text())
        except ValueError as err:
            raise HistoryError(f"{self.where}, user {self.user!r}: not JSON ({err})") from None
        return _line_records(obj, self.where)[1]

    def converted(self) -> list[Record]:
        records = _records_from_json(self.user, self.items(), self.where)
        return sort_chronologically(records) if self.chronological else records

    def as_line(self, reader: "_BlockReader | None" = None) -> str:
        line = self.text(reader)
        if line is not None:
            return line if line.endswith("\n") else line + "\n"
        return _user_line(self.user, self.parsed)

    def sorted_on_read(self) -> "_Unread":
        return _Unread(self.user, self.source, self._lineno, line=self.line, parsed=self.parsed, spool=self.spool,
                       index=self.index, chronological=True)


def _user_line(user: str, items: list) -> str:
    return json.dumps({"user": user, "records": items}, ensure_ascii=False, separators=(",", ":")) + "\n"


def _line_records(obj: Any, where: str) -> tuple[str, list]:
    """(user, items) of one parsed line, checked."""
    if not isinstance(obj, dict):
        raise HistoryError(f"{where}: expected an object {{\"user\": ..., \"records\": [...]}}, got {type(obj).__name__}")
    user, items = obj.get("user"), obj.get("records")
    if not isinstance(user, str) or not user:
        raise HistoryError(f"{where}, field 'user': expected the user id (a non-empty string), got {user!r}")
    if not isinstance(items, list):
        raise HistoryError(f"{where}, user {user!r}, field 'records': expected a list of records, got {type(items).__name__}")
    return user, items


def _user_of_line(line: str, source: str, lineno: int) -> tuple[str, list | None]:
    """The user a line belongs to, reading only its start when it is written the way tapper writes it
    ({"user":"...","records":...}); any other line (e.g. hand-edited with spaces) is parsed whole and checked
    now. Returns (user, items parsed now or None)."""
    if line.startswith(_LINE_START + '"'):
        try:
            user, end = scanstring(line, len(_LINE_START) + 1)
        except ValueError:
            user, end = "", -1
        if user and line.startswith(_RECORDS_KEY, end):
            return user, None
    where = f"{source} line {lineno}"
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise HistoryError(f"{where}: not JSON ({err})") from None
    return _line_records(obj, where)


def _check_first(users: Mapping[str, Any], user: str, source: str, lineno: int) -> None:
    if user in users:
        raise HistoryError(f"{source} line {lineno}: user {user!r} again (first on line {users[user].lineno})")


def _decoded(raw: bytes, source: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HistoryError(f"{source} line {lineno}: not UTF-8 ({err})") from None


def _text_mode_lines(fh: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file split as text mode splits them ("\\n", "\\r\\n" and a lone "\\r" end a line),
    each without its line end: so a spooled read numbers lines, and writes them back, exactly as a read without
    a spool does (which reads in text mode and writes every line back ending in "\\n")."""
    for raw in fh:
        if b"\r" not in raw:  # the usual case: one line ending in "\n" (or the last line, without one)
            yield raw[:-1] if raw.endswith(b"\n") else raw
            continue
        parts = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if parts[-1] == b"":  # the piece after the final line end
            parts.pop()
        yield from parts


class HistoryStore(MutableMapping[str, list[Record]]):
    """{user_id: [Record]} whose users are converted from stored JSON the first time they are read.

    Reading a user returns the store's list for them (converted once, then kept); assigning stores the list.
    `copy()` is cheap: unread users are shared, read ones copied, so two stores never share a list.
    """

    def __init__(self) -> None:
        self._users: dict[str, list[Record] | _Unread] = {}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "HistoryStore":
        store = cls()
        store._users = {u: _Unread(u, where, parsed=items) for u, items in _checked_top_level(obj, where).items()}
        return store

    @classmethod
    def read(cls, path: str | Path, spool_dir: str | Path | None = None) -> "HistoryStore":
        """A history file: JSON lines (`histories.jsonl`), or the legacy one-document `histories.json`.

        `spool_dir`: keep the JSON lines' text in an unlinked scratch file there instead of memory (created if
        missing; a local disk, see tapper.scratch). A legacy file is parsed whole either way."""
        path = Path(path)
        if path.suffix == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise HistoryError(f"{path}: not JSON ({err})") from None
            return cls.from_json(obj, str(path))
        if spool_dir is not None:
            spool_dir = prepare_scratch_dir(spool_dir, "history spool dir", HistorySpoolError)
        store, source = cls(), str(path)
        users = store._users
        # Binary, decoded line by line: a byte that is not UTF-8 is named by its line. Opened before the spool is
        # made, so a missing file creates none.
        with open(path, "rb") as fh:
            spool = _Spool(spool_dir, source) if spool_dir is not None else None
            for n, raw in enumerate(_text_mode_lines(fh), 1):
                line = _decoded(raw, source, n)
                if not line.strip():
                    continue
                user, parsed = _user_of_line(line, source, n)
                _check_first(users, user, source, n)
                if parsed is not None:  # a line not in tapper's shape was parsed whole to check it: keep the items
                    users[user] = _Unread(user, source, n, parsed=parsed)
                elif spool is None:
                    users[user] = _Unread(user, source, n, line=line)
                else:
                    users[user] = _Unread(user, source, spool=spool, index=spool.add(raw, n))
        if spool is not None:
            spool.finish()
        return store

    def __getitem__(self, user: str) -> list[Record]:
        value = self._users[user]
        if isinstance(value, _Unread):
            value = value.converted()
            self._users[user] = value
        return value

    def __setitem__(self, user: str, records: Sequence[Record]) -> None:
        # Like a dict, a list is stored as given (so setdefault(u, []).extend(...) extends the stored list).
        self._users[str(user)] = records if isinstance(records, list) else list(records)

    def __delitem__(self, user: str) -> None:
        del self._users[user]

    def __iter__(self) -> Iterator[str]:
        return iter(self._users)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def copy(self) -> "HistoryStore":
        out = HistoryStore()
        out._users = {u: v if isinstance(v, _Unread) else list(v) for u, v in self._users.items()}
        return out

    def to_json(self) -> dict[str, list[dict]]:
        return {u: v.items() if isinstance(v, _Unread) else [record_to_json(r) for r in v] for u, v in self._users.items()}

    def lines(self) -> Iterator[str]:
        """The store as JSON lines, one user each; unread users' lines pass through as they were read."""
        reader = _BlockReader()  # spooled lines are read a block at a time
        for user, value in self._users.items():
            yield value.as_line(reader) if isinstance(value, _Unread) else _user_line(user, [record_to_json(r) for r in value])

    def unread(self) -> int:
        """Users whose items have not been converted yet."""
        return sum(isinstance(v, _Unread) for v in self._users.values())


def merge_histories(*stores: Mapping[str, Sequence[Record]]) -> HistoryStore:
    """Union per user by record id (later stores win), chronological.

    A user found in one store only and not read there yet stays unread (and is sorted when read), so merging
    two large stores costs only the users they share."""
    holders: dict[str, list[Mapping[str, Sequence[Record]]]] = {}
    for store in stores:
        for user in store:
            holders.setdefault(str(user), []).append(store)
    out = HistoryStore()
    for user, having in holders.items():
        if len(having) == 1 and isinstance(having[0], HistoryStore) and isinstance(having[0]._users[user], _Unread):
            stored = having[0]._users[user]
            out._users[user] = stored.sorted_on_read()
            continue
        by_id: dict[str, Record] = {}
        for store in having:
            for record in store[user]:
                by_id[record.id] = record
        out._users[user] = sort_chronologically(list(by_id.values()))
    return out


def histories_file(directory: str | Path) -> Path:
    """The history file of a bundle or snapshot directory: `histories.jsonl`, or the legacy `histories.json`
    when only that one is there (the JSON-lines path when neither is)."""
    directory = Path(directory)
    legacy = directory / LEGACY_HISTORIES_FILE
    current = directory / HISTORIES_FILE
    return legacy if legacy.is_file() and not current.is_file() else current


def read_histories_dir(directory: str | Path, spool_dir: str | Path | None = None) -> HistoryStore:
    """The history store of a bundle or snapshot directory (empty when it has no history file); `spool_dir`: see
    HistoryStore.read."""
    path = histories_file(directory)
    return HistoryStore.read(path, spool_dir) if path.is_file() else HistoryStore()


def write_histories(path: str | Path, histories: Mapping[str, Sequence[Record]]) -> Path:
    """Write `histories` as JSON lines at `path`, atomically (temporary file, then rename)."""
    store = histories if isinstance(histories, HistoryStore) else None
    if store is None:
        store = HistoryStore()
        for user, records in histories.items():
            store[str(user)] = list(records)

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(store.lines())

    return atomic_write(path, _write)
