"""In-memory form of a LaMP dataset: users, their dated history, and queries.

Everything downstream (splits, embedding cache, both training stages,
evaluation, baselines) reads these types only, never raw JSON.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


class LampDataError(ValueError):
    """Bad LaMP input. The message always names the file, the record id and the field."""

    def __init__(self, path: str, record_id: str | None, field_name: str | None, problem: str):
        self.path = str(path)
        self.record_id = record_id
        self.field_name = field_name
        self.problem = problem
        where = f"{self.path}"
        if record_id is not None:
            where += f", record {record_id!r}"
        if field_name is not None:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Record:
    """One item of a user's history (a LaMP profile entry).

    `fields` holds the task's profile fields (e.g. text/title/category for
    LaMP-2N) as strings; `date` is None when LaMP gives no date. `raw_date`
    keeps the original string so that files round-trip unchanged.
    """

    id: str
    fields: dict[str, str]
    date: dt.date | None = None
    raw_date: str | None = None


@dataclass
class Query:
    """One LaMP question: a user's input, their history (chronological), and the gold output."""

    id: str
    input: str
    profile: list[Record]
    user_id: str
    output: str | None = None


@dataclass
class LampDataset:
    task: str
    queries: list[Query] = field(default_factory=list)
    # The questions file it was read from, for error messages (None: built in memory). Not part of
    # the data: two datasets with the same queries are equal wherever they were read from.
    source: str | None = field(default=None, compare=False)

    def users(self) -> list[str]:
        seen: dict[str, None] = {}
        for q in self.queries:
            seen.setdefault(q.user_id, None)
        return list(seen)

    def by_user(self) -> dict[str, list[Query]]:
        out: dict[str, list[Query]] = {}
        for q in self.queries:
            out.setdefault(q.user_id, []).append(q)
        return out


@dataclass
class Example:
    """A training or evaluation example as the models see it.

    `history` is the list of records the prefix may attend over (already
    restricted to what precedes this example in time for Stage-2 training).
    `query_date` is the example's own date, or None (then the latest history
    date is used, docs/design.md).
    """

    id: str
    user_id: str
    input: str
    target: str | None
    history: list[Record]
    query_date: dt.date | None = None
    # The record this example was made from (Stage-2 training examples), so
    # that retrieval baselines can exclude it; None for real queries.
    source_record_id: str | None = None
