"""Builders on the real shared data, the synthetic generator, the CLI and the bundled default dataset."""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import pytest

from tapper.builders.cli import register
from tapper.builders.movielens import build_movielens, rating_label
from tapper.builders.news import (
    CATEGORY_TO_LAMP_2N,
    build_news,
    build_news_dataset,
    is_single_author,
    read_articles,
    source_files,
)
from tapper.builders.synthetic import build_synthetic, candidates_in, generate_synthetic
from tapper.data.chronology import first_out_of_order
from tapper.data.lamp_io import load_lamp
from tapper.cli import main as cli_main
from tapper.data.splits import make_splits, user_history

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEWS = SHARED_DATA / "news_category"
MOVIELENS = SHARED_DATA / "movielens_small"
needs_news = pytest.mark.skipif(not NEWS.is_dir(), reason=f"shared News Category data not found at {NEWS}")
needs_movielens = pytest.mark.skipif(not MOVIELENS.is_dir(), reason=f"shared MovieLens data not found at {MOVIELENS}")


def load_build(out: Path):
    return load_lamp(out / "questions.json", out / "outputs.json")


# --- news ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def articles():
    if not NEWS.is_dir():
        pytest.skip(f"shared News Category data not found at {NEWS}")
    return read_articles(source_files(NEWS), progress=False)


def test_single_author_rule():
    assert is_single_author("Lee Moran") and is_single_author("Carla K. Johnson, AP")
    assert not is_single_author("Eric Tucker and Mary Clare Jalonick, AP")
    assert not is_single_author("Gary Fields, Ashraf Khalil, AP")
    assert not is_single_author("Laurie Kellman And Zeke Miller") and not is_single_author("  ")


@needs_news
def test_real_news_author_counts(articles):
    per_author = collections.Counter(a.author for a in articles)
    # Pinned on the shared 2018-2022 subset (13,456 rows): 1,118 single-author
    # bylines, 83 with >= 20 articles (the data README also says 83).
    assert len(per_author) == 1118
    assert sum(n >= 20 for n in per_author.values()) == 83
    assert per_author.most_common(1) == [("Lee Moran", 863)]


@needs_news
@pytest.mark.parametrize(
    "task, users, records, top_user",
    [
        ("LaMP_2N", 132, 7114, "Mary Papenfuss"),
        ("LaMP_4", 160, 10080, "Lee Moran"),
    ],
)
def test_real_news_build_loads_back_chronological(tmp_path, task, users, records, top_user):
    summary = build_news(NEWS, tmp_path, task=task, progress=False)
    assert (summary.users, summary.queries, summary.records) == (users, users, records)
    ds = load_build(tmp_path)
    assert ds.task == task and len(ds.queries) == users
    assert ds.queries[0].user_id == top_user
    for query in ds.queries:
        assert len(query.profile) >= 5
        assert first_out_of_order(query.profile) is None
        assert all(r.date is not None for r in query.profile)
    readme = (tmp_path / "README.md").read_text()
    assert "CC BY 4.0" in readme and "arXiv:2209.11429" in readme and f"tapper build news --task {task}" in readme


@needs_news
def test_news_queries_are_each_authors_latest_articles(articles):
    ds = build_news_dataset(articles, "LaMP_4", queries_per_user=2, min_history=5)
    date_of = {a.record_id: a.date for a in articles}
    headline_of = {a.record_id: a.headline for a in articles}
    for user, queries in ds.by_user().items():
        assert len(queries) == 2
        latest_profile = max(date_of[r.id] for r in queries[0].profile)
        assert all(date_of[q.id] >= latest_profile for q in queries)
        assert all(q.output == headline_of[q.id] for q in queries)
        assert all(q.input.startswith("Generate a headline for the following article: ") for q in queries)


@needs_news
def test_news_lamp2n_labels_and_caps(articles):
    source_categories = {a.category for a in articles}
    assert len(source_categories) == 29
    # Every LaMP-2N label is reachable from the shared subset.
    assert {CATEGORY_TO_LAMP_2N[c] for c in source_categories if c in CATEGORY_TO_LAMP_2N} == set(
        CATEGORY_TO_LAMP_2N.values()
    )
    ds = build_news_dataset(articles, "LaMP_2N", max_users=7, max_history=12)
    assert len(ds.queries) == 7 and all(len(q.profile) == 12 for q in ds.queries)


def test_failed_build_writes_nothing(tmp_path, articles):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no queries"):
        build_news(NEWS, out, min_history=100000, progress=False)
    assert not out.exists() or not any(out.iterdir())


# --- movielens -------------------------------------------------------------------------


def test_rating_rounds_half_up():
    assert [rating_label(x) for x in (0.5, 1.0, 1.5, 2.5, 3.5, 4.5, 5.0)] == ["1", "1", "2", "3", "4", "5", "5"]


@needs_movielens
def test_real_movielens_build(tmp_path):
    summary = build_movielens(MOVIELENS, tmp_path, progress=False)
    # 610 users, one query each; profiles capped at the 200 most recent ratings.
    assert (summary.users, summary.queries, summary.records) == (610, 610, 58675)
    ds = load_build(tmp_path)
    assert ds.task == "LaMP_3"
    assert all(first_out_of_order(q.profile) is None and len(q.profile) <= 200 for q in ds.queries)
    assert (tmp_path / "README.txt").read_text().startswith("Summary")  # the licence travels along
    assert "Harper" in (tmp_path / "README.md").read_text()
    query = ds.queries[0]
    assert query.input.startswith("What is the score of the following movie") and " genres: " in query.input
    # Records turned into training examples use the same movie wording as the queries.
    splits = make_splits(ds, None, stage2_users=5)
    assert splits.stage2_train[0].input.startswith("What is the score of the following movie")
    assert splits.stage2_train[0].target in {"1", "2", "3", "4", "5"}


@needs_movielens
def test_movielens_max_users_keeps_most_active(tmp_path):
    build_movielens(MOVIELENS, tmp_path, max_users=3, max_history=10, progress=False)
    ds = load_build(tmp_path)
    assert [q.user_id for q in ds.queries] == ["u414", "u599", "u474"]
    assert all(len(q.profile) == 10 for q in ds.queries)


# --- synthetic -------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_fast(tmp_path):
    start = time.perf_counter()
    generate_synthetic(users=200, seed=3)
    assert time.perf_counter() - start < 1.0
    build_synthetic(tmp_path / "a", seed=7, users=20)
    build_synthetic(tmp_path / "b", seed=7, users=20)
    build_synthetic(tmp_path / "c", seed=8, users=20)
    for name in ("questions.json", "outputs.json", "users.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "questions.json").read_bytes() != (tmp_path / "c" / "questions.json").read_bytes()
    ds = load_build(tmp_path / "a")
    assert ds.task == "LaMP_2N" and len(ds.queries) == 20


def test_synthetic_pinned_numbers():
    ds, people = generate_synthetic(seed=0)
    assert sum(len(q.profile) for q in ds.queries) == 5843
    assert sum(p.drifts for p in people) == 96
    assert ds.queries[0].output == "travel"


def _oracle_accuracies(seed: int = 0):
    ds, people = generate_synthetic(users=200, seed=seed)
    everyone = collections.Counter(r.fields["category"] for q in ds.queries for r in q.profile)

    def candidates(query):
        return candidates_in(query.input.split("article: ", 1)[1])

    def by_counts(records):
        counts = collections.Counter(r.fields["category"] for r in records)
        return lambda query: max(candidates(query), key=lambda c: (counts[c], everyone[c], c))

    def accuracy(predict, queries):
        return sum(predict(q)(q) == q.output for q in queries) / len(queries)

    global_guess = lambda q: lambda query: max(candidates(query), key=lambda c: (everyone[c], c))
    recent = lambda q: by_counts(q.profile[len(q.profile) // 2 :])
    full = lambda q: by_counts(q.profile)
    drifting = [q for q, p in zip(ds.queries, people) if p.drifts]
    return {
        "global": accuracy(global_guess, ds.queries),
        "recent": accuracy(recent, ds.queries),
        "drift_recent": accuracy(recent, drifting),
        "drift_full": accuracy(full, drifting),
    }


def test_synthetic_signal_is_personal_and_drifts():
    acc = _oracle_accuracies(seed=0)
    # Text alone reveals only the candidates; the user's history picks among them.
    assert acc["recent"] - acc["global"] >= 0.3, acc
    # For drifting users, recent history is the better guide.
    assert acc["drift_recent"] > acc["drift_full"], acc


def test_synthetic_gaps_change_dates_only():
    daily, _ = generate_synthetic(users=30, seed=5)
    gapped, _ = generate_synthetic(users=30, seed=5, gap_days=(1, 7))
    gaps = []
    for a, b in zip(daily.queries, gapped.queries):
        # Same articles and labels: the gaps come from their own random stream.
        assert (a.input, a.output) == (b.input, b.output)
        assert [r.fields for r in a.profile] == [r.fields for r in b.profile]
        dates = [r.date for r in b.profile]
        gaps += [(y - x).days for x, y in zip(dates, dates[1:])]
    assert min(gaps) >= 1 and max(gaps) <= 7 and len(set(gaps)) == 7
    assert {(y.date - x.date).days for q in daily.queries for x, y in zip(q.profile, q.profile[1:])} == {1}


def test_synthetic_drift_position():
    ds, people = generate_synthetic(users=60, seed=2, drift_fraction=1.0, drift_at=(0.6, 0.8))
    for q, person in zip(ds.queries, people):
        n = len(q.profile)
        index = next(i for i, r in enumerate(q.profile) if r.date >= person.drift_date)
        assert 0.6 * n - 1 <= index <= 0.8 * n, (n, index)
    with pytest.raises(ValueError, match="drift_at"):
        generate_synthetic(users=2, drift_at=(0.5, 1.0))
    with pytest.raises(ValueError, match="gap_days"):
        generate_synthetic(users=2, gap_days=(3, 2))


def test_synthetic_users_json_and_drift_dates(tmp_path):
    build_synthetic(tmp_path, users=30, seed=1, drift_fraction=1.0, queries_per_user=2)
    users = json.loads((tmp_path / "users.json").read_text())["users"]
    ds = load_build(tmp_path)
    assert len(users) == 30 and all(u["drifts"] for u in users.values())
    for user, queries in ds.by_user().items():
        info = users[user]
        history = user_history(queries)
        assert history[0].raw_date < info["drift_date"] <= history[-1].raw_date
        assert info["ranking_after"][:3] != info["ranking_before"][:3]
        assert sorted(info["ranking_after"]) == sorted(info["ranking_before"])
        # Records after the drift follow the new ranking.
        for record in history:
            ranking = info["ranking_after"] if record.raw_date >= info["drift_date"] else info["ranking_before"]
            options = candidates_in(record.fields["text"])
            assert record.fields["category"] == min(options, key=ranking.index)


# --- CLI and the bundled default -------------------------------------------------------


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapper")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_builds_synthetic(tmp_path, capsys):
    args = cli_parser().parse_args(
        ["build", "synthetic", "--out", str(tmp_path), "--users", "5", "--history", "6", "9", "--seed", "2"]
    )
    assert args.func(args) == 0
    assert "5 users" in capsys.readouterr().out
    readme = (tmp_path / "README.md").read_text()
    assert f"tapper build synthetic --out {tmp_path} --users 5 --history 6 9" in readme


@pytest.mark.parametrize("kind", ["news", "movielens", "synthetic"])
def test_cli_help(kind, capsys):
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["build", kind, "--help"])
    assert "--out" in capsys.readouterr().out


def test_bundled_default_dataset(tmp_path):
    """The quickstart's data: 4 queries per author (the 25 most active give 100 evaluation queries), built by the
    command its README records, from the shared news data, with the licence and attribution."""
    from tapper.resources import default_dataset_paths

    questions, outputs, task = default_dataset_paths()
    ds = load_lamp(questions, outputs, task)
    assert task == "LaMP_2N" and len(ds.queries) == 444 and len(ds.users()) == 111
    assert all(5 <= len(q.profile) <= 30 for q in ds.queries)
    assert questions.stat().st_size + outputs.stat().st_size < 3_000_000
    readme = (questions.parent / "README.md").read_text()
    assert "CC BY 4.0" in readme and "arXiv:2209.11429" in readme
    command = next(line for line in readme.splitlines() if line.startswith("tapper build news"))
    if not (SHARED_DATA / "news_category").is_dir():
        pytest.skip("the shared news data is not on this machine")
    args = command.split()[3:]
    args[args.index("--out") + 1] = str(tmp_path)
    args[args.index("--source") + 1] = str(SHARED_DATA / "news_category")
    assert cli_main(["build", "news", *args, "--no-progress"]) == 0
    assert (tmp_path / "questions.json").read_bytes() == questions.read_bytes()
    assert (tmp_path / "outputs.json").read_bytes() == outputs.read_bytes()


def test_synthetic_reverse_drift_turns_the_whole_ranking_around(tmp_path):
    ds, people = generate_synthetic(users=20, seed=3, drift_fraction=1.0, drift_kind="reverse")
    for q, person in zip(ds.queries, people):
        assert person.ranking_after == tuple(reversed(person.ranking_before))
        for record in q.profile:
            ranking = person.ranking_on(record.date)
            assert record.fields["category"] == min(candidates_in(record.fields["text"]), key=ranking.index)
    for q, person in zip(ds.queries, people):  # the drift date is inside the history, as with a swap
        assert q.profile[0].date < person.drift_date <= q.profile[-1].date
    with pytest.raises(ValueError, match="drift_kind"):
        generate_synthetic(users=2, drift_kind="sideways")
    summary = build_synthetic(tmp_path, users=10, seed=3, drift_kind="reverse")
    readme = (tmp_path / "README.md").read_text()
    assert "--drift-kind reverse" in readme and "reverse their whole ranking" in readme
    assert summary.users == 10
