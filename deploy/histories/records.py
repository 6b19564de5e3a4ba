"""A stored history record as JSON (a LaMP profile item) and back; the error every malformed stored history raises."""

from __future__ import annotations

from typing import Any, Mapping

from tapper.data.chronology import parse_lamp_date
from tapper.data.types import Record


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
