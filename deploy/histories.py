"""Users' history stores as the serving stack keeps them: LaMP profile items on disk, Records in use.

A bundle's `histories.json` and a snapshot's hold every user's records ({user_id: [LaMP profile items]}).
A server reads the whole file at start, on reload and on adopting a snapshot, but a request touches one
user. Turning every item into a Record up front (date parsing, field copies) was most of a restart's time
(about 10 s of 18 s at 100,000 users with 10 records each, and twice that when a snapshot replaced the
bundle's histories), so `HistoryStore` keeps each user's items as parsed JSON and converts them the first
time that user is read. Writing a snapshot passes the unread users' items through untouched.

The price is when a malformed item is found: a hand-edited file with a bad record now fails the first
request for that user (HistoryError naming the file, user, record and field) instead of the server's start.
Files tapper writes come from Records, which are valid by construction; the top level (an object of lists)
is still checked at load.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, MutableMapping, Sequence

from tapper.data.chronology import parse_lamp_date, sort_chronologically
from tapper.data.lamp_io import record_to_json
from tapper.data.types import Record


class HistoryError(ValueError):
    """A stored history is malformed. Names the file, user, record and field."""


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
    """A user's items as parsed JSON, not converted yet (never modified, so stores may share it).

    `where` names the file they came from; `chronological`: sort the records when they are converted (what
    merge_histories promises)."""

    __slots__ = ("items", "where", "chronological")

    def __init__(self, items: list, where: str, chronological: bool = False):
        self.items = items
        self.where = where
        self.chronological = chronological


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
        store._users = {u: _Unread(items, where) for u, items in _checked_top_level(obj, where).items()}
        return store

    def __getitem__(self, user: str) -> list[Record]:
        value = self._users[user]
        if isinstance(value, _Unread):
            records = _records_from_json(user, value.items, value.where)
            value = sort_chronologically(records) if value.chronological else records
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
        return {u: v.items if isinstance(v, _Unread) else [record_to_json(r) for r in v] for u, v in self._users.items()}

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
            out._users[user] = _Unread(stored.items, stored.where, chronological=True)
            continue
        by_id: dict[str, Record] = {}
        for store in having:
            for record in store[user]:
                by_id[record.id] = record
        out._users[user] = sort_chronologically(list(by_id.values()))
    return out
