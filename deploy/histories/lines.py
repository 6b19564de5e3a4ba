"""One user's line of a history file (JSON lines), kept unread until the user is first read."""

from __future__ import annotations

import json
from json.decoder import scanstring
from typing import Any, BinaryIO, Iterator, Mapping

from deploy.histories.records import HistoryError, _records_from_json
from deploy.histories.spool import _BlockReader, _Spool
from tapper.data.chronology import sort_chronologically
from tapper.data.history_file import user_line
from tapper.data.types import Record

_LINE_START = '{"user":'
_RECORDS_KEY = ',"records":'


class _Unread:
    """A user's stored history, not converted yet (never modified, so stores may share it).

    Either `line` (the user's line of a JSON-lines file, as read: parsed only when the user is read), `spool`
    and `index` (the same line, kept in a spool file instead of memory), or `parsed` (the user's items, from a
    legacy one-document file or a line not in tapper's shape). `source` names the file (one string shared by all
    its users) and `lineno` the line, for errors; `chronological`: sort the records when they are converted
    (what merge_histories promises)."""

    __slots__ = ("user", "source", "_lineno", "line", "parsed", "spool", "index", "chronological")

    def __init__(
        self,
        user: str,
        source: str,
        lineno: int | None = None,
        *,
        line: str | None = None,
        parsed: list | None = None,
        spool: _Spool | None = None,
        index: int = -1,
        chronological: bool = False,
    ):
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
        return _Unread(
            self.user,
            self.source,
            self._lineno,
            line=self.line,
            parsed=self.parsed,
            spool=self.spool,
            index=self.index,
            chronological=True,
        )


_user_line = user_line  # the core's line format (tapper.data.history_file)


def _line_records(obj: Any, where: str) -> tuple[str, list]:
    """(user, items) of one parsed line, checked."""
    if not isinstance(obj, dict):
        raise HistoryError(f'{where}: expected an object {{"user": ..., "records": [...]}}, got {type(obj).__name__}')
    user, items = obj.get("user"), obj.get("records")
    if not isinstance(user, str) or not user:
        raise HistoryError(f"{where}, field 'user': expected the user id (a non-empty string), got {user!r}")
    if not isinstance(items, list):
        raise HistoryError(
            f"{where}, user {user!r}, field 'records': expected a list of records, got {type(items).__name__}"
        )
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
