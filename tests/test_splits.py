"""Stage-1 / Stage-2 / eval splits (paper Table 6)."""

from __future__ import annotations

import datetime as dt

import pytest

from tapper.data.splits import make_splits, users_by_activity
from tapper.data.tasks import get_task
from tapper.data.types import LampDataError, LampDataset, Query, Record

SPEC = get_task("LaMP_2N")


def records(user: str, n: int, start: int = 1) -> list[Record]:
    return [
        Record(
            id=f"{user}-{i}",
            fields={"text": f"t{i}", "title": f"h{i}", "category": SPEC.labels[i % 15]},
            date=dt.date(2020, 1, start + i),
            raw_date=None,
        )
        for i in range(n)
    ]


def dataset() -> LampDataset:
    queries = []
    # u_big: 6 records, u_mid and u_tie: 4 each (tie broken by id), u_small: 2.
    for user, n in [("u_small", 2), ("u_tie", 4), ("u_big", 6), ("u_mid", 4)]:
        queries.append(
            Query(
                id=f"{user}-q", input=SPEC.make_input(text="x"), profile=records(user, n), user_id=user, output="travel"
            )
        )
    # A second query of u_big sharing the profile adds no new records.
    queries.append(
        Query(id="u_big-q2", input=SPEC.make_input(text="y"), profile=records("u_big", 6), user_id="u_big", output=None)
    )
    return LampDataset(task="LaMP_2N", queries=queries)


def test_most_active_users_go_to_stage2_ties_by_id():
    ds = dataset()
    assert users_by_activity(ds) == ["u_big", "u_mid", "u_tie", "u_small"]
    splits = make_splits(ds, SPEC, stage2_users=2)
    assert splits.stage2_users == ["u_big", "u_mid"]
    assert splits.stage1_users == ["u_tie", "u_small"]


def test_stage2_examples_see_only_earlier_records():
    ds = dataset()
    splits = make_splits(ds, "LaMP-2N", stage2_users=2)
    big = [e for e in splits.stage2_train if e.user_id == "u_big"]
    assert len(big) == 6 and len(splits.stage2_train) == 6 + 4
    full = ds.queries[2].profile
    for i, example in enumerate(big):
        assert example.history == full[:i]
        assert example.source_record_id == full[i].id
        assert example.query_date == full[i].date
        assert example.target == full[i].fields["category"]
        assert example.input == SPEC.make_input(text=full[i].fields["text"])
        assert all(r.date < example.query_date for r in example.history)


def test_eval_is_stage2_queries_with_full_history():
    ds = dataset()
    splits = make_splits(ds, None, stage2_users=2)
    assert [e.id for e in splits.eval] == ["u_big-q", "u_big-q2", "u_mid-q"]
    for example in splits.eval:
        query = next(q for q in ds.queries if q.id == example.id)
        assert example.history == query.profile and example.query_date is None
        assert example.target == query.output


def test_stage1_has_records_and_gold_queries_of_other_users():
    splits = make_splits(dataset(), SPEC, stage2_users=2)
    users = {e.user_id for e in splits.stage1_train}
    assert users == {"u_tie", "u_small"}
    assert len(splits.stage1_train) == (4 + 1) + (2 + 1)
    assert {e.id for e in splits.stage1_train if e.source_record_id is None} == {"u_tie-q", "u_small-q"}


def lamp1_dataset(n_users: int = 3, n_papers: int = 4) -> LampDataset:
    spec = get_task("LaMP_1")
    queries = []
    for u in range(n_users):
        papers = [
            Record(
                id=f"u{u}-p{i}",
                fields={"title": f"paper {i} of u{u}", "abstract": f"abstract {i} of u{u}"},
                date=dt.date(2015 + i, 1, 1),
            )
            for i in range(n_papers)
        ]
        queries.append(
            Query(
                id=f"u{u}-q",
                input=spec.make_input(title="new", ref1="a", ref2="b"),
                user_id=f"u{u}",
                output="[1]",
                profile=papers,
            )
        )
    return LampDataset(task="LaMP_1", queries=queries)


def test_lamp1_papers_become_self_citation_questions():
    spec = get_task("LaMP_1")
    ds = lamp1_dataset()
    splits = make_splits(ds, spec, stage2_users=2)
    # Before: no example at all, so Stage 2 trained nothing and "TAP-PER" on LaMP-1 was the untrained prefix.
    assert len(splits.stage2_train) == 2 * 4
    for ex in splits.stage2_train:
        own = {r.fields["title"] for r in ds.by_user()[ex.user_id][0].profile}
        quoted = ex.input.split('"')
        ref1, ref2 = quoted[-4], quoted[-2]
        positive, negative = (ref1, ref2) if ex.target == "[1]" else (ref2, ref1)
        assert positive in own and negative not in own  # the negative is another user's paper
        assert positive not in {r.fields["title"] for r in ex.history}  # the answer is never in the history
        assert all(r.date < ex.query_date for r in ex.history)
    assert {ex.target for ex in splits.stage2_train} == {"[1]", "[2]"}
    # Deterministic: the same questions on every run.
    assert [e.input for e in make_splits(ds, spec, stage2_users=2).stage2_train] == [
        e.input for e in splits.stage2_train
    ]


def test_an_empty_stage2_training_split_is_an_error():
    ds = LampDataset(
        task="LaMP_2N",
        queries=[Query(id="q", input=SPEC.make_input(text="x"), user_id="u", output="travel", profile=[])],
    )
    with pytest.raises(ValueError, match="LaMP_2N: the Stage-2 training split is empty"):
        make_splits(ds, SPEC, stage2_users=1)


def test_a_record_after_one_of_the_users_queries_is_refused():
    early = records("u", 3)
    later = records("u", 5)  # a second query whose profile runs two days past the first query
    ds = LampDataset(
        task="LaMP_2N",
        source="q.json",
        queries=[
            Query(id="q1", input=SPEC.make_input(text="x"), profile=early, user_id="u", output="travel"),
            Query(id="q2", input=SPEC.make_input(text="y"), profile=later, user_id="u", output="travel"),
        ],
    )
    with pytest.raises(LampDataError, match=r"q\.json, record 'u-3', field 'date'.*user 'u'.*after query 'q1'"):
        make_splits(ds, SPEC, stage2_users=1)


def test_too_many_stage2_users_is_an_error():
    with pytest.raises(ValueError, match="between 0 and"):
        make_splits(dataset(), SPEC, stage2_users=5)
