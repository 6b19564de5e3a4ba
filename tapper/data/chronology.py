"""Dates of history records and the chronological order of a profile.

LaMP dates come as `YYYY-MM-DD`, as a bare year `YYYY` (LaMP-5 papers), or
not at all (LaMP-3, LaMP-7). A bare year is read as 1 January of that year so
that it still orders against full dates.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Sequence

from tapper.data.types import Record

_FULL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_YEAR_ONLY = re.compile(r"^\d{4}$")


def parse_lamp_date(raw: object) -> dt.date | None:
    """None for a missing date; ValueError for anything that is not YYYY-MM-DD or YYYY."""
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        raise ValueError(f"date must be a string 'YYYY-MM-DD' or 'YYYY', got {type(raw).__name__}")
    text = raw.strip()
    if _FULL_DATE.match(text):
        return dt.date.fromisoformat(text)  # raises ValueError on e.g. 2020-02-31
    if _YEAR_ONLY.match(text):
        return dt.date(int(text), 1, 1)
    raise ValueError(f"unparsable date {raw!r}: expected 'YYYY-MM-DD' or 'YYYY'")


def sort_chronologically(records: Sequence[Record]) -> list[Record]:
    """Dated records sorted by date (stable), each undated record kept in its slot.

    Undated records have no position in time, so they keep both their place and
    their order relative to each other; the dated ones are sorted among the
    remaining slots. A fully undated profile is returned unchanged.
    """
    dated_slots = [i for i, r in enumerate(records) if r.date is not None]
    dated_sorted = sorted((records[i] for i in dated_slots), key=lambda r: r.date)
    out = list(records)
    for slot, record in zip(dated_slots, dated_sorted):
        out[slot] = record
    return out


def first_out_of_order(records: Sequence[Record]) -> int | None:
    """Index of the first dated record that is earlier than a dated record before it."""
    latest: dt.date | None = None
    for i, record in enumerate(records):
        if record.date is None:
            continue
        if latest is not None and record.date < latest:
            return i
        latest = record.date
    return None
