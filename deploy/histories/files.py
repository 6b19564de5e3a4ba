"""History files of bundle and snapshot directories: reading one into a HistoryStore (the format and its writer:
tapper.data.history_file)."""

from __future__ import annotations

from pathlib import Path

from deploy.histories.store import HistoryStore

# The file's name and writer are the core's (a promotion writes bundles): re-exported here for the server.
from tapper.data.history_file import HISTORIES_FILE, LEGACY_HISTORIES_FILE, histories_file, write_histories  # noqa: F401


def read_histories_dir(directory: str | Path, spool_dir: str | Path | None = None) -> HistoryStore:
    """The history store of a bundle or snapshot directory (empty when it has no history file); `spool_dir`: see
    HistoryStore.read."""
    path = histories_file(directory)
    return HistoryStore.read(path, spool_dir) if path.is_file() else HistoryStore()
