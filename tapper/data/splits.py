"""Stage-1 / Stage-2 / evaluation splits, following the paper's Table 6 (OPPU's convention).

- Stage-2 users are the N most active users (most distinct history records;
  ties broken by user id so the split is deterministic). Evaluation asks
  their queries with their full history.
- Stage-1 users are all the others. Stage 1 is plain task adaptation, so each
  of their history records becomes a query->answer pair, and their queries
  with golds are added too.
- Stage-2 training turns each history record of a Stage-2 user into an
  example whose history is only the records before it, dated with the
  record's own date: the model learns to predict record i from records < i,
  exactly the situation of a real query.

History records that make no example (TaskSpec.record_example returns None,
i.e. LaMP_1) are skipped, so LaMP_1 has no record-made examples.
"""
from __future__ import annotations

from dataclasses import dataclass

from tapper.data.chronology import sort_chronologically
from tapper.data.tasks import TaskSpec, get_task
from tapper.data.types import Example, LampDataset, Query, Record


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


def record_examples(user_id: str, history: list[Record], task: TaskSpec) -> list[Example]:
    """One example per history record, seeing only the records before it."""
    examples = []
    for i, record in enumerate(history):
        pair = task.record_example(record)
        if pair is None:
            continue
        model_input, target = pair
        examples.append(Example(
            id=f"{user_id}/{record.id}",
            user_id=user_id,
            input=model_input,
            target=target,
            history=history[:i],
            query_date=record.date,
            source_record_id=record.id,
        ))
    return examples


def query_example(query: Query) -> Example:
    # LaMP queries carry no date; the model falls back to the latest history date.
    return Example(id=query.id, user_id=query.user_id, input=query.input, target=query.output,
                   history=list(query.profile), query_date=None)


def make_splits(ds: LampDataset, task: TaskSpec | str | None, stage2_users: int) -> Splits:
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

    stage1_train: list[Example] = []
    for user in stage1:
        stage1_train.extend(record_examples(user, user_history(by_user[user]), spec))
        stage1_train.extend(query_example(q) for q in by_user[user] if q.output is not None)

    stage2_train: list[Example] = []
    evaluation: list[Example] = []
    for user in stage2:
        stage2_train.extend(record_examples(user, user_history(by_user[user]), spec))
        evaluation.extend(query_example(q) for q in by_user[user])

    return Splits(stage1_users=stage1, stage2_users=stage2, stage1_train=stage1_train,
                  stage2_train=stage2_train, eval=evaluation)
