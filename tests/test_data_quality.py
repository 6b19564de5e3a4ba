"""The Great Expectations suite on raw LaMP files: what passes, and failures named in words."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
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
    from steps.data_quality import validate_files

    r = validate_files(files(*lamp))
    assert r.success and not r.failures
    assert r.summary["queries"] == 16 and r.summary["users"] == 8 and r.summary["expectations"] >= 20
    assert "PASSED" in r.html and "GX Data Docs" in r.html


def test_each_broken_invariant_is_named(lamp, tmp_path):
    from steps.data_quality import validate_files

    q, o = lamp
    data = json.loads(q.read_text())
    data[0]["profile"][1]["category"] = "nonsense"      # label outside the task's set
    data[1]["profile"][0]["date"] = "2020-13-45"         # date that does not parse
    data[2]["id"] = data[3]["id"]                         # duplicate query id
    del data[4]["profile"][0]["title"]                    # required field missing
    bad = tmp_path / "questions.json"
    bad.write_text(json.dumps(data))
    golds = json.loads(o.read_text())
    golds["golds"] = golds["golds"][1:]                   # a query without a gold
    bad_o = tmp_path / "outputs.json"
    bad_o.write_text(json.dumps(golds))
    r = validate_files(files(bad, bad_o))
    assert not r.success
    text = r.message()
    for needle in ("field_category", "date_ok", "queries: column values to be unique", "field_title", "has_gold"):
        assert needle in text, (needle, text)
    assert "FAILED" in r.html


def test_unparsable_file_is_a_failure_not_a_crash(lamp, tmp_path):
    from steps.data_quality import validate_files

    bad = tmp_path / "questions.json"
    bad.write_text("[{")
    r = validate_files(files(bad, lamp[1]))
    assert not r.success and any("not valid JSON" in f for f in r.failures)


def test_history_length_bounds(lamp):
    from steps.data_quality import validate_files

    r = validate_files(files(*lamp), min_history=1, max_history=3)
    assert not r.success and any("profile_len" in f for f in r.failures)
