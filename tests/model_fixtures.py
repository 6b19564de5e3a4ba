"""Small, deterministic data + the tiny backbone for model tests (milliseconds to build)."""

from __future__ import annotations

import datetime as dt
import random

from tapper.data.tasks import get_task
from tapper.data.types import Example, Record

TASK = get_task("LaMP_2N")


def tiny_examples(n_users: int = 6, n_hist: int = 5, seed: int = 0):
    """Each user always files under one category; returns (stage2 train examples, eval examples, users)."""
    rng = random.Random(seed)
    train, evals, users = [], [], []
    for u in range(n_users):
        label = rng.choice(TASK.labels)
        uid = f"user{u}"
        hist = [
            Record(
                id=f"{uid}-{j}",
                fields={"text": f"news item {j} of {uid}", "title": f"title {j}", "category": label},
                date=dt.date(2021, 1, 1) + dt.timedelta(days=7 * j),
            )
            for j in range(n_hist)
        ]
        for j, r in enumerate(hist):
            inp, tgt = TASK.record_example(r)
            train.append(
                Example(
                    id=r.id,
                    user_id=uid,
                    input=inp,
                    target=tgt,
                    history=hist[:j],
                    query_date=r.date,
                    source_record_id=r.id,
                )
            )
        evals.append(
            Example(
                id=f"q-{uid}",
                user_id=uid,
                input=TASK.make_input(text=f"a new item by {uid}"),
                target=label,
                history=hist,
            )
        )
        users.append(uid)
    return train, evals, users


def corpus(train, evals):
    texts = [TASK.prompt(e.input) + TASK.format_target(e.target) for e in train + evals]
    texts += [TASK.record_text(r) for e in evals for r in e.history]
    return texts
