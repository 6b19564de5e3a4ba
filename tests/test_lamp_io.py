"""LaMP file I/O: round trips, chronological order, and every bad-input case."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tapper.data.lamp_io import load_lamp, read_outputs, write_outputs, write_predictions, write_questions, golds_of
from tapper.data.tasks import get_task
from tapper.data.types import LampDataError, LampDataset, Query, Record
from tapper.data.validation import validate_dataset

CATEGORY_QUESTION = get_task("LaMP_2N").make_input(text="Senate passes the bill.")


def news_questions() -> list[dict]:
    return [
        {
            "id": "q1",
            "input": CATEGORY_QUESTION,
            "user_id": "alice",
            "profile": [
                {"id": "p2", "text": "b", "title": "B", "category": "sports", "date": "2020-03-01"},
                {"id": "p1", "text": "a", "title": "A", "category": "politics", "date": "2019"},
                {"id": "p3", "text": "c", "title": "C", "category": "crime"},
            ],
        },
        {
            "id": "q2",
            "input": CATEGORY_QUESTION,
            "profile": [{"id": "p9", "text": "z", "title": "Z", "category": "travel", "date": "2021-12-31"}],
        },
    ]


def news_outputs(task: str = "LaMP_2N") -> dict:
    return {"task": task, "golds": [{"id": "q1", "output": "politics"}, {"id": "q2", "output": "travel"}]}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_json(tmp_path / "questions.json", news_questions()), write_json(
        tmp_path / "outputs.json", news_outputs()
    )


def test_load_infers_task_and_attaches_golds(files):
    ds = load_lamp(*files)
    assert ds.task == "LaMP_2N"
    assert [q.output for q in ds.queries] == ["politics", "travel"]
    assert ds.queries[0].user_id == "alice"
    # No user_id: the question is its own user.
    assert ds.queries[1].user_id == "q2"


def test_profile_sorted_chronologically_with_year_only_and_missing_dates(files):
    profile = load_lamp(*files).queries[0].profile
    # p1 (2019 -> Jan 1) and p2 (2020-03-01) swap; undated p3 keeps its slot.
    assert [r.id for r in profile] == ["p1", "p2", "p3"]
    assert profile[0].date == dt.date(2019, 1, 1) and profile[0].raw_date == "2019"
    assert profile[2].date is None and profile[2].raw_date is None


def test_round_trip_is_identity(files, tmp_path):
    ds = load_lamp(*files)
    write_questions(ds, tmp_path / "rt_q.json")
    write_outputs(ds.task, golds_of(ds), tmp_path / "rt_o.json")
    again = load_lamp(tmp_path / "rt_q.json", tmp_path / "rt_o.json")
    assert again == ds
    # Raw dates survive as written ("2019" stays a bare year).
    raw = json.loads((tmp_path / "rt_q.json").read_text())
    assert raw[0]["profile"][0]["date"] == "2019"
    assert "date" not in raw[0]["profile"][2]


def test_in_memory_dataset_round_trips(tmp_path):
    ds = LampDataset(
        task="LaMP_4",
        queries=[
            Query(
                id="7",
                input="Generate a headline for the following article: x",
                user_id="u",
                profile=[Record(id="r1", fields={"text": "t", "title": "T"}, date=dt.date(2020, 1, 2))],
                output="Head",
            )
        ],
    )
    write_questions(ds, tmp_path / "q.json")
    write_outputs("lamp-4", golds_of(ds), tmp_path / "o.json")
    again = load_lamp(tmp_path / "q.json", tmp_path / "o.json")
    assert again.queries[0].profile[0].date == dt.date(2020, 1, 2)
    assert again.queries[0].output == "Head" and again.task == "LaMP_4"


def test_predictions_use_outputs_format(tmp_path):
    write_predictions("LaMP-3", {"a": "4", "b": "1"}, tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text()) == {
        "task": "LaMP_3",
        "golds": [{"id": "a", "output": "4"}, {"id": "b", "output": "1"}],
    }
    assert read_outputs(tmp_path / "p.json") == ("LaMP_3", {"a": "4", "b": "1"})


def test_questions_without_outputs_need_a_task(files):
    questions, _ = files
    ds = load_lamp(questions, task="lamp_2n")
    assert all(q.output is None for q in ds.queries)
    with pytest.raises(LampDataError, match="no task given"):
        load_lamp(questions)


def test_integer_ids_and_numeric_scores_become_strings(tmp_path):
    q = write_json(tmp_path / "q.json", [{"id": 12, "input": "x", "profile": [{"id": 5, "text": "good", "score": 4}]}])
    o = write_json(tmp_path / "o.json", {"task": "LaMP_3", "golds": [{"id": 12, "output": "5"}]})
    ds = load_lamp(q, o)
    assert ds.queries[0].id == "12" and ds.queries[0].profile[0].fields["score"] == "4"


def test_writes_are_atomic_and_leave_no_temp_files(files, tmp_path):
    ds = load_lamp(*files)
    out = tmp_path / "out"
    write_questions(ds, out / "questions.json")
    assert sorted(p.name for p in out.iterdir()) == ["questions.json"]


# --- bad input: each names file, record id and field ---------------------------------


def expect_error(questions, outputs, tmp_path, file_name: str, record_id: str | None, field: str | None, task=None):
    q = (
        write_json(tmp_path / "questions.json", questions)
        if not isinstance(questions, str)
        else _raw(tmp_path / "questions.json", questions)
    )
    o = None
    if outputs is not None:
        o = (
            write_json(tmp_path / "outputs.json", outputs)
            if not isinstance(outputs, str)
            else _raw(tmp_path / "outputs.json", outputs)
        )
    with pytest.raises(LampDataError) as info:
        load_lamp(q, o, task=task)
    error = info.value
    message = str(error)
    assert file_name in message, message
    if record_id is not None:
        assert repr(record_id) in message, message
        assert error.record_id == record_id
    if field is not None:
        assert repr(field) in message, message
        assert error.field_name == field
    return error


def _raw(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def mutated(fn) -> list[dict]:
    questions = news_questions()
    fn(questions)
    return questions


def test_not_json(tmp_path):
    expect_error("[{oops", news_outputs(), tmp_path, "questions.json", None, None)
    expect_error(news_questions(), "{nope", tmp_path, "outputs.json", None, None)


def test_top_level_not_a_list(tmp_path):
    err = expect_error({"id": "q1"}, news_outputs(), tmp_path, "questions.json", None, None)
    assert "list" in str(err)


@pytest.mark.parametrize("field", ["input", "profile"])
def test_missing_question_field(tmp_path, field):
    expect_error(mutated(lambda qs: qs[0].pop(field)), news_outputs(), tmp_path, "questions.json", "q1", field)


def test_missing_question_id(tmp_path):
    expect_error(mutated(lambda qs: qs[1].pop("id")), news_outputs(), tmp_path, "questions.json", "question [1]", "id")


def test_profile_item_missing_id(tmp_path):
    expect_error(
        mutated(lambda qs: qs[0]["profile"][1].pop("id")),
        news_outputs(),
        tmp_path,
        "questions.json",
        "q1/profile[1]",
        "id",
    )


def test_profile_item_missing_task_field(tmp_path):
    expect_error(
        mutated(lambda qs: qs[0]["profile"][0].pop("title")), news_outputs(), tmp_path, "questions.json", "p2", "title"
    )


def test_profile_label_outside_label_set(tmp_path):
    def bad(qs):
        qs[0]["profile"][0]["category"] = "weird news"

    expect_error(mutated(bad), news_outputs(), tmp_path, "questions.json", "p2", "category")


def test_gold_label_outside_label_set(tmp_path):
    outputs = news_outputs()
    outputs["golds"][1]["output"] = "Travel"  # case matters, as in LaMP
    expect_error(news_questions(), outputs, tmp_path, "outputs.json", "q2", "output")


@pytest.mark.parametrize("raw_date", ["2020/03/01", "March 2020", "2020-13-01", "20", 2020.5])
def test_unparsable_date(tmp_path, raw_date):
    def bad(qs):
        qs[0]["profile"][0]["date"] = raw_date

    expect_error(mutated(bad), news_outputs(), tmp_path, "questions.json", "p2", "date")


def test_duplicate_query_ids(tmp_path):
    def bad(qs):
        qs[1]["id"] = "q1"

    expect_error(mutated(bad), news_outputs(), tmp_path, "questions.json", "q1", "id")


def test_duplicate_profile_ids_within_a_profile(tmp_path):
    def bad(qs):
        qs[0]["profile"][1]["id"] = "p2"

    expect_error(mutated(bad), news_outputs(), tmp_path, "questions.json", "p2", "id")


def test_conflicting_profile_ids_within_a_user(tmp_path):
    def bad(qs):
        qs[1]["user_id"] = "alice"
        qs[1]["profile"][0]["id"] = "p1"  # same id as alice's other p1, different record

    expect_error(mutated(bad), news_outputs(), tmp_path, "questions.json", "p1", "id")


def test_query_absent_from_outputs(tmp_path):
    outputs = news_outputs()
    outputs["golds"].pop()
    expect_error(news_questions(), outputs, tmp_path, "outputs.json", "q2", "golds")


def test_outputs_task_mismatch(tmp_path):
    expect_error(news_questions(), news_outputs("LaMP_4"), tmp_path, "outputs.json", None, "task", task="LaMP_2N")


def test_outputs_unknown_task(tmp_path):
    err = expect_error(news_questions(), news_outputs("LaMP_9"), tmp_path, "outputs.json", None, "task")
    assert "LaMP_2N" in str(err)  # lists the valid names


def test_validation_catches_unsorted_in_memory_profile():
    ds = LampDataset(
        task="LaMP_4",
        queries=[
            Query(
                id="q",
                input="x",
                user_id="u",
                profile=[
                    Record(id="late", fields={"text": "", "title": ""}, date=dt.date(2021, 1, 1)),
                    Record(id="early", fields={"text": "", "title": ""}, date=dt.date(2020, 1, 1)),
                ],
            )
        ],
    )
    with pytest.raises(LampDataError) as info:
        validate_dataset(ds)
    assert info.value.record_id == "early" and info.value.field_name == "date"
