"""Invariants every LampDataset must hold, whether loaded from files or built in memory.

The loader calls this after parsing; builders and tests may call it on
datasets they construct. Each failure is a LampDataError naming the source,
the record id and the field.
"""

from __future__ import annotations

from tapper.data.chronology import first_out_of_order
from tapper.data.tasks import TaskSpec, get_task
from tapper.data.types import LampDataError, LampDataset, Record

IN_MEMORY = "<in-memory dataset>"


def validate_dataset(ds: LampDataset, task: TaskSpec | None = None, source: str = IN_MEMORY) -> None:
    spec = task or get_task(ds.task)
    seen_queries: set[str] = set()
    # user -> record id -> the record first seen under that id, to catch two
    # different records of one user sharing an id across that user's queries.
    user_records: dict[str, dict[str, Record]] = {}
    for query in ds.queries:
        if query.id in seen_queries:
            raise LampDataError(source, query.id, "id", "duplicate query id")
        seen_queries.add(query.id)
        if spec.labels is not None and query.output is not None and query.output not in spec.labels:
            raise LampDataError(
                source,
                query.id,
                "output",
                f"gold {query.output!r} is not one of the {spec.name} labels {list(spec.labels)}",
            )
        _validate_profile(query.id, query.profile, spec, source)
        known = user_records.setdefault(query.user_id, {})
        for record in query.profile:
            previous = known.setdefault(record.id, record)
            if previous != record:
                raise LampDataError(
                    source,
                    record.id,
                    "id",
                    f"user {query.user_id!r} has two different profile records with this id "
                    f"(seen again in query {query.id!r})",
                )


def _validate_profile(query_id: str, profile: list[Record], spec: TaskSpec, source: str) -> None:
    seen: set[str] = set()
    for record in profile:
        if record.id in seen:
            raise LampDataError(source, record.id, "id", f"duplicate profile id in the profile of query {query_id!r}")
        seen.add(record.id)
        for name in spec.profile_fields:
            if name not in record.fields:
                raise LampDataError(
                    source, record.id, name, f"profile item of query {query_id!r} lacks {spec.name} field"
                )
        if spec.labels is not None and spec.target_field is not None:
            value = record.fields[spec.target_field]
            if value not in spec.labels:
                raise LampDataError(
                    source,
                    record.id,
                    spec.target_field,
                    f"{value!r} is not one of the {spec.name} labels {list(spec.labels)} (query {query_id!r})",
                )
    bad = first_out_of_order(profile)
    if bad is not None:
        raise LampDataError(
            source,
            profile[bad].id,
            "date",
            f"profile of query {query_id!r} is not chronological: {profile[bad].date} comes after a later date",
        )
