"""History files of bundle and snapshot directories: which file, reading it, writing it atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from deploy.histories.store import HistoryStore
from tapper.atomic import atomic_write
from tapper.data.types import Record

HISTORIES_FILE = "histories.jsonl"
LEGACY_HISTORIES_FILE = "histories.json"  # written before JSON lines; read, never written


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
