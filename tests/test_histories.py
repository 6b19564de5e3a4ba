"""The serving history store: users converted when first read, unread ones written back untouched, merges."""

from __future__ import annotations

import gc
import json
import os

import pytest

from deploy.histories import (
    HistoryError,
    HistorySpoolError,
    HistoryStore,
    histories_file,
    histories_from_json,
    histories_to_json,
    merge_histories,
    read_histories_dir,
    write_histories,
)
from tapper.data.chronology import parse_lamp_date
from tapper.data.types import Record


def _item(rid: str, date: str | None, category: str = "travel") -> dict:
    item = {"id": rid, "text": f"story {rid}", "category": category}
    if date is not None:
        item["date"] = date
    return item


def _rec(rid: str, date: str | None) -> Record:
    return Record(
        id=rid, fields={"text": f"story {rid}", "category": "travel"}, date=parse_lamp_date(date), raw_date=date
    )


STORED = {"a": [_item("a1", "2021-01-01"), _item("a2", "2021-02-01")], "b": [_item("b1", "2020")], "c": []}


def test_users_are_converted_when_read_and_unread_ones_are_written_back_as_they_were():
    obj = json.loads(json.dumps(STORED))
    store = HistoryStore.from_json(obj, "h.json")
    assert len(store) == 3 and list(store) == ["a", "b", "c"] and store.unread() == 3
    assert [r.id for r in store["a"]] == ["a1", "a2"] and store["a"][0].date.isoformat() == "2021-01-01"
    assert store.unread() == 2 and store["a"] is store["a"]  # converted once, then kept
    assert "b" in store and "z" not in store and store.get("z", []) == []
    out = store.to_json()
    assert out["b"] is obj["b"]  # passed through, not converted and re-encoded
    assert out == STORED and histories_to_json(store) == STORED
    # The eager reader gives the same records.
    assert {u: [r.id for r in rs] for u, rs in histories_from_json(obj, "h.json").items()} == {
        u: [r.id for r in store[u]] for u in store
    }


def test_copies_never_share_a_list_and_setdefault_extends_the_stored_one():
    store = HistoryStore.from_json(json.loads(json.dumps(STORED)), "h.json")
    store["a"]  # read before the copy
    twin = store.copy()
    twin["a"].append(_rec("a3", "2021-03-01"))
    twin.setdefault("new", []).append(_rec("n1", "2022-01-01"))
    twin["b"].append(_rec("b2", "2021"))  # read for the first time in the copy
    assert [r.id for r in store["a"]] == ["a1", "a2"] and [r.id for r in store["b"]] == ["b1"] and "new" not in store
    assert [r.id for r in twin["a"]] == ["a1", "a2", "a3"] and [r.id for r in twin["new"]] == ["n1"]
    del twin["c"]
    assert "c" in store and "c" not in twin


def test_a_malformed_record_is_found_when_its_user_is_read_and_named():
    obj = {
        "good": [_item("g1", "2021-01-01")],
        "bad": [_item("x1", "2021-01-01"), _item("x2", "yesterday")],
        "noid": [{"text": "no id"}],
    }
    store = HistoryStore.from_json(obj, "h.json")  # the top level is fine: loading does not look inside
    assert [r.id for r in store["good"]] == ["g1"]
    with pytest.raises(
        HistoryError, match=r"^h\.json, user 'bad' record \[1\], field 'date': unparsable date 'yesterday'"
    ):
        store["bad"]
    with pytest.raises(HistoryError, match=r"^h\.json, user 'noid' record \[0\]: missing 'id'"):
        store["noid"]
    with pytest.raises(HistoryError, match=r"^h\.json: expected an object"):
        HistoryStore.from_json([1, 2], "h.json")
    with pytest.raises(HistoryError, match=r"^h\.json, user 'u': expected a list of records, got str"):
        HistoryStore.from_json({"u": "not a list"}, "h.json")


def test_merge_keeps_single_store_users_unread_sorts_them_and_unions_shared_users_by_id():
    older = HistoryStore.from_json(
        {
            "solo": [_item("s2", "2021-05-01"), _item("s0", None), _item("s1", "2021-01-01")],
            "both": [_item("x1", "2021-01-01"), _item("x2", "2021-02-01", "sports")],
        },
        "old.json",
    )
    newer = {"both": [_rec("x2", "2021-02-01"), _rec("x3", "2021-03-01")], "fresh": [_rec("f1", "2022-01-01")]}
    merged = merge_histories(older, newer)
    assert merged.unread() == 1  # only "solo", which one store holds and nobody read
    # Dated records sorted, the undated one kept in its slot (tapper.data.chronology.sort_chronologically).
    assert [r.id for r in merged["solo"]] == ["s1", "s0", "s2"]
    assert [r.id for r in merged["both"]] == ["x1", "x2", "x3"] and merged["both"][1].fields[
        "category"
    ] == "travel"  # later wins
    assert [r.id for r in merged["fresh"]] == ["f1"]
    assert [r.id for r in older["solo"]] == ["s2", "s0", "s1"]  # the source store is unchanged


def _jsonl(path, users: dict) -> None:
    path.write_text(
        "".join(json.dumps({"user": u, "records": items}, separators=(",", ":")) + "\n" for u, items in users.items())
    )


def test_json_lines_are_read_lazily_and_unread_lines_are_written_back_byte_for_byte(tmp_path):
    src = tmp_path / "histories.jsonl"
    _jsonl(src, STORED)
    store = HistoryStore.read(src)
    assert list(store) == ["a", "b", "c"] and store.unread() == 3
    assert [r.id for r in store["b"]] == ["b1"] and store.unread() == 2
    store["a"].append(_rec("a3", "2021-03-01"))
    out = write_histories(tmp_path / "out" / "histories.jsonl", store)
    lines = out.read_text().splitlines()
    assert lines[2] == src.read_text().splitlines()[2]  # "c", never read: its line as it was
    assert [json.loads(x)["user"] for x in lines] == ["a", "b", "c"]
    again = HistoryStore.read(out)
    assert [r.id for r in again["a"]] == ["a1", "a2", "a3"] and again.to_json()["b"] == STORED["b"]
    assert not list((tmp_path / "out").glob("*.tmp"))  # written to a temporary name, then renamed
    # A plain mapping is written the same way, and an empty store is an empty file.
    plain = write_histories(tmp_path / "plain.jsonl", {"p": [_rec("p1", "2020-01-01")]})
    assert [r.id for r in HistoryStore.read(plain)["p"]] == ["p1"]
    assert len(HistoryStore.read(write_histories(tmp_path / "empty.jsonl", {}))) == 0


def test_a_hand_edited_line_loads_and_bad_lines_are_named_by_file_and_line(tmp_path):
    f = tmp_path / "histories.jsonl"
    # Spaces and another key order: not the shape tapper writes, so the line is parsed (and checked) at load.
    f.write_text(
        '{"records": [{"id": "e1", "date": "2021-01-01", "text": "x"}], "user": "edited"}\n\n'
        + json.dumps({"user": "bad", "records": [_item("x1", "someday")]}, separators=(",", ":"))
        + "\n"
    )
    store = HistoryStore.read(f)
    assert store.unread() == 2 and [r.id for r in store["edited"]] == ["e1"]
    with pytest.raises(HistoryError, match=r"histories\.jsonl line 3, user 'bad' record \[0\], field 'date'"):
        store["bad"]
    for text, message in [
        ('{"user":"u","records":[]}\nnot json\n', r"line 2: not JSON"),
        ('{"user":"u","records":[]}\n{"user":"u","records":[]}\n', r"line 2: user 'u' again \(first on line 1\)"),
        ('{"records":[]}\n', r"line 1, field 'user'"),
        ('{"user": "u", "records": {"id": "r"}}\n', r"line 1, user 'u', field 'records': expected a list"),
        ('{"user":"u","records":[{"id":"r"}\n', r"line 1, user 'u': not JSON"),  # cut short: found when read
    ]:
        f.write_text(text)
        with pytest.raises(HistoryError, match=message):
            HistoryStore.read(f)["u"]


def spool_files(directory) -> list[str]:
    """What this process's open descriptors point at among the history spool files of `directory`."""
    prefix = str(directory.resolve()) + "/tapper-histories-"
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, closed by now
            continue
        if target.startswith(prefix):
            out.append(target)
    return out


def _mixed_file(path) -> dict:
    """A history file with what a real one may hold: tapper's lines (more than the spool's 1 MiB write buffer and
    4 MiB read block in all, one line longer than a block), non-ASCII text, a hand-edited line, blank lines, CRLF
    and lone-CR line ends, no newline at the end. Returns {user: items}."""
    users = {f"u{i:03d}": [_item(f"u{i}-{j}", f"2021-0{1 + j}-01") for j in range(3)] for i in range(300)}
    users["u001"][0]["text"] = "Zürich café — 東京 " * 400  # ~8 KB: 300 users pass 1 MiB, so the spool flushes mid-file
    for items in users.values():
        items[1]["text"] = "x" * 15000
    users["u250"][2]["text"] = "y" * (5 << 20)
    lines = [
        json.dumps({"user": u, "records": items}, separators=(",", ":"), ensure_ascii=False)
        for u, items in users.items()
    ]
    lines.insert(5, "")
    lines.insert(9, '{ "records": [{"id": "e1", "date": "2021-01-01", "text": "edited"}], "user": "edited" }')
    users["edited"] = [{"id": "e1", "date": "2021-01-01", "text": "edited"}]
    text = "\n".join(lines[:20]) + "\r\n" + "\r\n".join(lines[20:40]) + "\r" + "\n".join(lines[40:])  # no final newline
    path.write_bytes(text.encode("utf-8"))
    return users


def test_a_spooled_store_reads_and_writes_every_user_exactly_like_one_in_memory(tmp_path):
    src = tmp_path / "histories.jsonl"
    users = _mixed_file(src)
    plain, spooled = HistoryStore.read(src), HistoryStore.read(src, spool_dir=tmp_path / "spool")
    assert list(spooled) == list(plain) and set(plain) == set(users) and spooled.unread() == len(users)
    assert list(plain)[8] == "edited" and plain._users["edited"].lineno == 10
    assert [spooled._users[u].lineno for u in spooled] == [plain._users[u].lineno for u in plain]
    # Written back unread: the same bytes (line ends normalised to "\n" both ways).
    assert (
        write_histories(tmp_path / "a.jsonl", plain).read_bytes()
        == write_histories(tmp_path / "b.jsonl", spooled).read_bytes()
    )
    for user in users:
        assert spooled[user] == plain[user] and histories_to_json({user: spooled[user]})[user] == users[user]
    assert spooled.unread() == 0 and spooled.to_json() == plain.to_json() == users
    # Read, changed and written back: still the same bytes.
    for store in (plain, spooled):
        store["u007"].append(_rec("u7-new", "2022-01-01"))
        store["brand-new"] = [_rec("n1", "2022-01-01")]
    assert (
        write_histories(tmp_path / "a.jsonl", plain).read_bytes()
        == write_histories(tmp_path / "b.jsonl", spooled).read_bytes()
    )
    # A legacy one-document file is parsed whole with or without a spool dir (nothing spooled).
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "histories.json").write_text(json.dumps(STORED))
    assert HistoryStore.read(legacy / "histories.json", tmp_path / "spool2").to_json() == STORED
    assert (
        spool_files(tmp_path / "spool2") == [] and read_histories_dir(legacy, tmp_path / "spool2").to_json() == STORED
    )


def test_a_byte_that_is_not_utf8_is_named_by_file_and_line_with_or_without_a_spool(tmp_path):
    f = tmp_path / "histories.jsonl"
    f.write_bytes(b'{"user":"u","records":[]}\n{"user":"w","records":[{"id":"\xff"}]}\n')
    for spool in (None, tmp_path / "spool"):
        with pytest.raises(HistoryError, match=f"^{f} line 2: not UTF-8"):
            HistoryStore.read(f, spool)


def test_a_spooled_store_names_the_source_file_and_line_in_every_error(tmp_path):
    f = tmp_path / "histories.jsonl"
    spool = tmp_path / "spool"
    f.write_text(
        '{"records": [{"id": "e1", "date": "2021-01-01", "text": "x"}], "user": "edited"}\n\n'
        + json.dumps({"user": "bad", "records": [_item("x1", "someday")]}, separators=(",", ":"))
        + "\n"
    )
    store = HistoryStore.read(f, spool)
    assert [r.id for r in store["edited"]] == ["e1"]
    with pytest.raises(HistoryError, match=f"^{f} line 3, user 'bad' record \\[0\\], field 'date'"):
        store["bad"]
    for text, message in [
        (b'{"user":"u","records":[]}\nnot json\n', r"line 2: not JSON"),
        (b'{"user":"u","records":[]}\r\n{"user":"u","records":[]}\n', r"line 2: user 'u' again \(first on line 1\)"),
        (
            b'{"user":"v","records":[]}\r{"user":"u","records":[]}\r{"user":"u","records":[]}',
            r"line 3: user 'u' again \(first on line 2\)",
        ),
        (b'{"records":[]}\n', r"line 1, field 'user'"),
        (b'{"user": "u", "records": {"id": "r"}}\n', r"line 1, user 'u', field 'records': expected a list"),
        (b'\n{"user":"u","records":[{"id":"r"}\n', r"line 2, user 'u': not JSON"),  # cut short: found when read
        (b'{"user":"u","records":[]}\n{"user":"w","records":[{"id":"\xff"}]}\n', r"line 2: not UTF-8"),
    ]:
        f.write_bytes(text)
        with pytest.raises(HistoryError, match=f"^{f} {message}"):
            HistoryStore.read(f, spool)["u"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(HistorySpoolError, match=f"^history spool dir {afile}: not a directory"):
        HistoryStore.read(f, afile)


def test_the_spool_file_is_unlinked_yet_readable_and_lives_as_long_as_a_store_that_shares_it(tmp_path):
    src, spool = tmp_path / "histories.jsonl", tmp_path / "scratch" / "spool"  # created when missing
    _jsonl(src, STORED)
    store = HistoryStore.read(src, spool)
    assert list(spool.iterdir()) == []  # unlinked at once: a crash leaves nothing behind
    (open_spool,) = spool_files(spool)
    assert open_spool.endswith(".spool (deleted)")
    twin = store.copy()
    merged = merge_histories(store, {"b": [_rec("b0", "2019")]})
    assert merged.unread() == 2  # "a" and "c": still in the spool
    del store
    gc.collect()
    assert spool_files(spool) == [open_spool]  # the copy and the merge still refer to it
    assert [r.id for r in twin["a"]] == ["a1", "a2"] and [r.id for r in merged["b"]] == ["b0", "b1"]
    assert list(merged.lines())[2] == src.read_text().splitlines(keepends=True)[2]  # "c", never read: verbatim
    del twin
    gc.collect()
    assert spool_files(spool) == [open_spool]
    assert [r.id for r in merged["a"]] == ["a1", "a2"] and merged["c"] == []
    del merged
    gc.collect()
    assert spool_files(spool) == []  # closed with the last store: its disk space is free


def test_a_legacy_one_document_file_still_loads_and_the_directory_reader_prefers_json_lines(tmp_path):
    (tmp_path / "histories.json").write_text(json.dumps(STORED))
    assert histories_file(tmp_path).name == "histories.json"
    store = read_histories_dir(tmp_path)
    assert [r.id for r in store["a"]] == ["a1", "a2"] and store.unread() == 2
    write_histories(tmp_path / "histories.jsonl", store)  # what the next snapshot writes
    assert histories_file(tmp_path).name == "histories.jsonl"
    assert HistoryStore.read(histories_file(tmp_path)).to_json() == STORED
    assert len(read_histories_dir(tmp_path / "nothing-here")) == 0


def test_the_history_store_bench_loads_each_format_and_mode_and_writes_back_the_same_histories(tmp_path):
    from test_synthetic_sweep import bench_script

    bench = bench_script("history_store")
    lines, legacy = bench.write_both(30, 3, tmp_path)
    assert HistoryStore.read(lines).to_json() == HistoryStore.read(legacy).to_json()
    out = tmp_path / "result.json"
    assert bench.main(["--users", "30,60", "--history", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [
        (r["users"], r["jsonl"]["users"], r["legacy_json"]["users"], r["jsonl_spooled"]["users"]) for r in rows
    ] == [(30, 30, 30, 30), (60, 60, 60, 60)]
    assert all(
        r[k]["load_s"] >= 0 and r[k]["write_back_s"] >= 0 and "rss_anon_added_mb" in r[k]
        for r in rows
        for k in ("jsonl", "legacy_json", "jsonl_spooled")
    )
    assert all(r["jsonl_spooled"]["write_back_identical"] for r in rows)
