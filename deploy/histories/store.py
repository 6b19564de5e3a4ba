"""HistoryStore: {user_id: [Record]} read from a history file, each user converted the first time it is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping, MutableMapping, Sequence

from deploy.histories.lines import (
    _BlockReader,
    _Unread,
    _check_first,
    _decoded,
    _text_mode_lines,
    _user_line,
    _user_of_line,
)
from deploy.histories.records import HistoryError, _checked_top_level
from deploy.histories.spool import HistorySpoolError, _Spool
from tapper.data.chronology import sort_chronologically
from tapper.data.lamp_io import record_to_json
from tapper.data.types import Record
from tapper.scratch import prepare_scratch_dir


def histories_to_json(histories: Mapping[str, Sequence[Record]]) -> dict[str, list[dict]]:
    if isinstance(histories, HistoryStore):
        return histories.to_json()
    return {str(u): [record_to_json(r) for r in recs] for u, recs in histories.items()}


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
        return {
            u: v.items() if isinstance(v, _Unread) else [record_to_json(r) for r in v] for u, v in self._users.items()
        }

    def lines(self) -> Iterator[str]:
        """The store as JSON lines, one user each; unread users' lines pass through as they were read."""
        reader = _BlockReader()  # spooled lines are read a block at a time
        for user, value in self._users.items():
            yield (
                value.as_line(reader)
                if isinstance(value, _Unread)
                else _user_line(user, [record_to_json(r) for r in value])
            )

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
