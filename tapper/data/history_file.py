"""The users' history file of a serving bundle or snapshot: its name and how one is written.

One user per line, LaMP profile items in time order:

    {"user":"<user id>","records":[<LaMP profile items {id, date?, <task fields>}>]}

Bundles written before JSON lines hold `histories.json` ({user_id: [items]}); readers still accept it
(deploy.histories reads both, lazily), writers only write JSON lines. The core writes the file (a promotion
exports a bundle); the server reads and rewrites it (deploy.histories.HistoryStore), with the same line format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tapper.atomic import atomic_write
from tapper.data.lamp_io import record_to_json
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


def user_line(user: str, items: list) -> str:
    """One user's line: compact JSON, non-ASCII text kept as is."""
    return json.dumps({"user": user, "records": items}, ensure_ascii=False, separators=(",", ":")) + "\n"


def history_lines(histories: Mapping[str, Sequence[Record]]) -> Iterable[str]:
    """The lines of `histories`; a store that keeps its own lines (the server's HistoryStore: unread users pass
    through as they were read) gives them itself."""
    own = getattr(histories, "lines", None)
    if callable(own):
        return own()
    return (user_line(str(user), [record_to_json(r) for r in records]) for user, records in histories.items())


def write_histories(path: str | Path, histories: Mapping[str, Sequence[Record]]) -> Path:
    """Write `histories` as JSON lines at `path`, atomically (temporary file, then rename)."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(history_lines(histories))

    return atomic_write(path, _write)
