"""Stage-1 / Stage-2 / evaluation splits, following the paper's Table 6 (OPPU's convention).

- Stage-2 users are the N most active users (most distinct history records;
  ties broken by user id so the split is deterministic). Evaluation asks
  their queries with their full history.
- Stage-1 users are all the others. Stage 1 is plain task adaptation, so each
  of their history records becomes a query->answer pair, and their queries
  with golds are added too.
- Stage-2 training turns each history record of a Stage-2 user into an
  example whose history is only the records before it: the model learns to
  predict record i from records < i, exactly the situation of a real query
  (time gaps are measured from the latest history record in both cases,
  `tapper.train.features.time_gaps`).
- LaMP_1 records hold no answer; they become self-citation questions
  (`tapper.data.citation`), with other users' titles as negatives.
- A user's Stage-2 records are the union of their queries' profiles, so a
  record dated after one of the user's queries would train P_u on that
  query's future: refused (LampDataError naming user, record and query).
- An empty Stage-1 or Stage-2 training set is an error naming the task and
  the split, never an untrained model scored as if trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tapper.data.chronology import sort_chronologically
from tapper.data.citation import citation_examples
from tapper.data.tasks import TaskSpec, get_task
from tapper.data.types import Example, LampDataError, LampDataset, Query, Record


@dataclass
class Splits:
    stage1_users: list[str]
    stage2_users: list[str]
    stage1_train: list[Example]
    stage2_train: list[Example]
    eval: list[Example]


def user_history(queries: list[Query]) -> list[Record]:
    """A user's records over all their queries (each id once), chronological."""
    seen: dict[str, Record] = {}
    for query in queries:
        for record in query.profile:
            seen.setdefault(record.id, record)
    return sort_chronologically(list(seen.values()))


def users_by_activity(ds: LampDataset) -> list[str]:
    """User ids, most history records first; ties by user id."""
    counts = {user: len(user_history(queries)) for user, queries in ds.by_user().items()}
    return sorted(counts, key=lambda user: (-counts[user], user))


def record_examples(
    user_id: str, history: list[Record], task: TaskSpec, distractors: Sequence[str] | None = None
) -> list[Example]:
    """One example per history record, seeing only the records before it (LaMP_1: `distractors` are the
    titles of other users' papers, the negatives of its self-citation questions)."""
    if task.name == "LaMP_1":
        return citation_examples(task, user_id, history, distractors)
    examples = []
    for i, record in enumerate(history):
        pair = task.record_example(record)
        if pair is None:
            continue
        model_input, target = pair
        examples.append(
            Example(
                id=f"{user_id}/{record.id}",
                user_id=user_id,
                input=model_input,
                target=target,
                history=history[:i],
                query_date=record.date,
                source_record_id=record.id,
            )
        )
    return examples


def query_example(query: Query) -> Example:
    # LaMP queries carry no date; the model falls back to the latest history date.
    return Example(
        id=query.id,
        user_id=query.user_id,
        input=query.input,
        target=query.output,
        history=list(query.profile),
        query_date=None,
    )


def check_no_future_records(user_id: str, queries: list[Query], history: list[Record], source: str) -> None:
    """Every record a user's Stage-2 examples train on must precede each of that user's queries.

    A query's time is that of the latest dated record of its own profile (LaMP queries carry no date)."""
    for query in queries:
        dated = [r.date for r in query.profile if r.date is not None]
        if not dated:
            continue
        asked = max(dated)
        own = {r.id for r in query.profile}
        for record in history:
            if record.id not in own and record.date is not None and record.date > asked:
                raise LampDataError(
                    source,
                    record.id,
                    "date",
                    f"user {user_id!r}: this record ({record.date}) comes after query {query.id!r} (whose profile ends "
                    f"{asked}); training on it would show P_u that query's future. Give each user's queries the same "
                    "profile, or drop the later records from the other queries' profiles",
                )


def distractor_titles(ds: LampDataset) -> dict[str, list[str]]:
    """LaMP_1: for each user, the titles of every other user's papers (self-citation negatives)."""
    titles = {user: [r.fields.get("title", "") for r in user_history(qs)] for user, qs in ds.by_user().items()}
    everything = [t for ts in titles.values() for t in ts]
    return {user: everything for user in titles}


def make_splits(ds: LampDataset, task: TaskSpec | str | None, stage2_users: int, source: str | None = None) -> Splits:
    spec = get_task(task or ds.task) if not isinstance(task, TaskSpec) else task
    # Records turned into examples must read like the dataset's own queries
    # (e.g. MovieLens-built LaMP_3 asks about movies, not reviews).
    spec = spec.adapted_to(q.input for q in ds.queries)
    ranked = users_by_activity(ds)
    if not 0 <= stage2_users <= len(ranked):
        raise ValueError(f"stage2_users must be between 0 and the number of users ({len(ranked)}), got {stage2_users}")
    stage2 = ranked[:stage2_users]
    stage1 = ranked[stage2_users:]
    by_user = ds.by_user()

    distractors = distractor_titles(ds) if spec.name == "LaMP_1" else {}
    source = source or ds.source or "<in-memory dataset>"

    stage1_train: list[Example] = []
    for user in stage1:
        stage1_train.extend(record_examples(user, user_history(by_user[user]), spec, distractors.get(user)))
        stage1_train.extend(query_example(q) for q in by_user[user] if q.output is not None)

    stage2_train: list[Example] = []
    evaluation: list[Example] = []
    for user in stage2:
        history = user_history(by_user[user])
        check_no_future_records(user, by_user[user], history, source)
        stage2_train.extend(record_examples(user, history, spec, distractors.get(user)))
        evaluation.extend(query_example(q) for q in by_user[user])
    if stage2 and not stage2_train:
        raise ValueError(
            f"{spec.name}: the Stage-2 training split is empty: the {len(stage2)} Stage-2 users' "
            "histories make no training example"
        )

    return Splits(
        stage1_users=stage1, stage2_users=stage2, stage1_train=stage1_train, stage2_train=stage2_train, eval=evaluation
    )
