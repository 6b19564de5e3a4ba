"""The Great Expectations suite on raw LaMP files: what passes, and failures named in words."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from workflow_data import make_lamp_2n  # noqa: E402

pytest.importorskip("great_expectations")


def files(q: Path, o: Path, task=None):
    from materializers.types import LampFiles

    qb, ob = q.read_bytes(), o.read_bytes()
    return LampFiles(str(q), str(o), qb, ob, hashlib.sha256(qb).hexdigest(), hashlib.sha256(ob).hexdigest(), task)


@pytest.fixture(scope="module")
def lamp(tmp_path_factory):
    return make_lamp_2n(tmp_path_factory.mktemp("dq"))


def test_clean_data_passes_with_report(lamp):
    from data_quality import validate_files

    r = validate_files(files(*lamp))
    assert r.success and not r.failures
    assert r.summary["queries"] == 16 and r.summary["users"] == 8 and r.summary["expectations"] >= 20
    assert "PASSED" in r.html and "GX Data Docs" in r.html


def test_each_broken_invariant_is_named(lamp, tmp_path):
    from data_quality import validate_files

    q, o = lamp
    data = json.loads(q.read_text())
    data[0]["profile"][1]["category"] = "nonsense"  # label outside the task's set
    data[1]["profile"][0]["date"] = "2020-13-45"  # date that does not parse
    data[2]["id"] = data[3]["id"]  # duplicate query id
    del data[4]["profile"][0]["title"]  # required field missing
    bad = tmp_path / "questions.json"
    bad.write_text(json.dumps(data))
    golds = json.loads(o.read_text())
    golds["golds"] = golds["golds"][1:]  # a query without a gold
    bad_o = tmp_path / "outputs.json"
    bad_o.write_text(json.dumps(golds))
    r = validate_files(files(bad, bad_o))
    assert not r.success
    text = r.message()
    # Each problem in words, naming the file, how many rows, and an example with its record and question.
    for needle in (
        "questions.json: 1 history record(s) have a 'category' that is not a LaMP_2N label (e.g. 'nonsense' in record",
        "questions.json: 1 history record(s) have a date that does not parse (e.g. '2020-13-45' in record",
        "questions.json: 2 question(s) share an id with another question",
        "questions.json: 1 history record(s) lack the field 'title'",
        "question(s) have no gold answer in the outputs file",
    ):
        assert needle in text, (needle, text)
    assert "value_set" not in text and r.summary["failed_expectations"] == len(r.failures) == 6
    assert "FAILED" in r.html


def test_unparsable_file_is_a_failure_not_a_crash(lamp, tmp_path):
    from data_quality import validate_files

    bad = tmp_path / "questions.json"
    bad.write_text("[{")
    r = validate_files(files(bad, lamp[1]))
    assert not r.success and r.failures == [
        "questions.json: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 3 (char 2))"
    ]
    # One check ran (the files parse) and it failed: the summary counts it once.
    assert r.summary["expectations"] == 1 and r.summary["failed_expectations"] == 1


def test_history_length_bounds(lamp):
    from data_quality import validate_files

    r = validate_files(files(*lamp), min_history=1, max_history=3)
    assert not r.success and any(
        "have a history (profile) of fewer than 1 or more than 3 records" in f for f in r.failures
    )
