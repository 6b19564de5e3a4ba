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
"""
from __future__ import annotations

import json
from json.decoder import scanstring
from pathlib import Path
from typing import Any, Iterator, Mapping, MutableMapping, Sequence

from tapper.atomic import atomic_write
from tapper.data.chronology import parse_lamp_date, sort_chronologically
from tapper.data.lamp_io import record_to_json
from tapper.data.types import Record


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


class _Unread:
    """A user's stored history, not converted yet (never modified, so stores may share it).

    Either `line` (the user's line of a JSON-lines file, as read: parsed only when the user is read) or
    `parsed` (the user's items, from a legacy one-document file). `source` names the file (one string shared
    by all its users) and `lineno` the line, for errors; `chronological`: sort the records when they are
    converted (what merge_histories promises)."""

    __slots__ = ("user", "line", "parsed", "source", "lineno", "chronological")

    def __init__(self, user: str, source: str, lineno: int | None = None, *, line: str | None = None,
                 parsed: list | None = None, chronological: bool = False):
        self.user, self.source, self.lineno, self.chronological = user, source, lineno, chronological
        self.line, self.parsed = line, parsed

    @property
    def where(self) -> str:
        return self.source if self.lineno is None else f"{self.source} line {self.lineno}"

    def items(self) -> list:
        if self.parsed is not None:
            return self.parsed
        try:
            obj = json.loads(self.line)
        except ValueError as err:
            raise HistoryError(f"{self.where}, user {self.user!r}: not JSON ({err})") from None
        return _line_records(obj, self.where)[1]

    def converted(self) -> list[Record]:
        records = _records_from_json(self.user, self.items(), self.where)
        return sort_chronologically(records) if self.chronological else records

    def as_line(self) -> str:
        if self.line is not None:
            return self.line if self.line.endswith("\n") else self.line + "\n"
        return _user_line(self.user, self.parsed)

    def sorted_on_read(self) -> "_Unread":
        return _Unread(self.user, self.source, self.lineno, line=self.line, parsed=self.parsed, chronological=True)


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
    def read(cls, path: str | Path) -> "HistoryStore":
        """A history file: JSON lines (`histories.jsonl`), or the legacy one-document `histories.json`."""
        path = Path(path)
        if path.suffix == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise HistoryError(f"{path}: not JSON ({err})") from None
            return cls.from_json(obj, str(path))
        store, source = cls(), str(path)
        users = store._users
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                user, parsed = _user_of_line(line, source, n)
                if user in users:
                    raise HistoryError(f"{source} line {n}: user {user!r} again (first on line {users[user].lineno})")
                users[user] = _Unread(user, source, n, line=None if parsed is not None else line, parsed=parsed)
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
        for user, value in self._users.items():
            yield value.as_line() if isinstance(value, _Unread) else _user_line(user, [record_to_json(r) for r in value])

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


def read_histories_dir(directory: str | Path) -> HistoryStore:
    """The history store of a bundle or snapshot directory (empty when it has no history file)."""
    path = histories_file(directory)
    return HistoryStore.read(path) if path.is_file() else HistoryStore()


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
