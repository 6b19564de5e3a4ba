"""Serving: a real uvicorn server on a tiny trained bundle, real HTTP requests.

Covers the bundle layout, /health, /info, /predict for known and unknown users, /feedback (only that user's
row changes, and only it and the new records are written, as one journal delta; new users get a row; the state
survives a restart), another replica picking the deltas up, nothing changed when writing fails, compaction into
snapshot generations (in the background), carrying histories over to a new bundle, 4xx errors naming the field,
and /metrics counting what was done. tests/test_serving_production.py covers batching, limits, auth, durability,
privacy and the OpenAI API.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploy.bundle import BundleError, export_bundle, read_bundle, read_histories
from deploy.journal import LiveState, StateError
from deploy.service import CURRENT_FILE, ServeConfig, TapperService
from serving_helpers import (
    ADMIN,
    Client,
    build_trained,
    record,
    running,
    serve_config,
    svc_record,  # noqa: F401
    wait_for,
)

TABLE = "prefix.user_table.weight"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Stage-1 backbone dir + Stage-2 state dir + the users' histories (seconds)."""
    return build_trained(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "b1"
    return export_bundle(
        trained["stage1"],
        trained["state"],
        "LaMP_2N",
        out,
        version="test-1",
        histories=trained["histories"],
        source={"zenml_model_version": "1"},
    )


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    state = tmp_path_factory.mktemp("live")
    cfg = serve_config(model_dir=bundle.path, state_dir=state, feedback_steps=3, feedback_lr=0.05, sync_seconds=0)
    with running(cfg) as (client, app):
        yield {"client": client, "state": state, "cfg": cfg, "app": app}


# --- bundle ------------------------------------------------------------------------------------------


def test_bundle_layout_and_checks(bundle, trained, tmp_path):
    info = read_bundle(bundle.path)
    assert info.task == "LaMP_2N" and info.version == "test-1"
    assert (bundle.path / "stage1" / "config.json").is_file() and (
        bundle.path / "tapper" / "prefix.safetensors"
    ).is_file()
    meta = json.loads((bundle.path / "model.json").read_text())
    assert meta["format"] == "tapper-bundle" and meta["users"] == 4 and meta["source"] == {"zenml_model_version": "1"}
    assert meta["backbone_hash"] == json.loads((trained["state"] / "tapper_config.json").read_text())["backbone_hash"]
    assert set(read_histories(info)) == set(trained["users"])
    assert not [p for p in bundle.path.parent.iterdir() if ".tmp-" in p.name]  # built aside, renamed into place
    with pytest.raises(BundleError, match="exists"):
        export_bundle(trained["stage1"], trained["state"], "LaMP_2N", bundle.path)
    with pytest.raises(BundleError, match="no prefix.safetensors"):
        export_bundle(trained["stage1"], tmp_path, "LaMP_2N", tmp_path / "x")
    with pytest.raises(ValueError):
        export_bundle(trained["stage1"], trained["state"], "LaMP_99", tmp_path / "y")
    with pytest.raises(BundleError, match="no model.json"):
        read_bundle(tmp_path)


# --- HTTP --------------------------------------------------------------------------------------------


def test_health_and_info(server, trained):
    c = server["client"]
    code, body = c.call("GET", "/health")
    assert code == 200 and body["status"] == "ok" and body["model_version"] == "test-1"
    code, info = c.call("GET", "/info", headers=ADMIN)
    assert code == 200
    assert info["task"] == "LaMP_2N" and info["model_version"] == "test-1" and len(info["backbone_hash"]) == 64
    assert info["users"][:4] == trained["users"] and info["per_user_params"] == 8 * 128 and info["shared_params"] > 0
    assert info["feedback"]["mode"] == "emb"
    # Without the admin token: no user ids, no server paths.
    code, public = c.call("GET", "/info")
    assert (
        code == 200
        and public["n_users"] >= 4
        and "users" not in public
        and "bundle" not in public
        and "state_dir" not in public
    )


def test_predict_known_and_unknown_user(server, trained):
    c = server["client"]
    known = trained["users"][0]
    q = trained["evals"][0]
    code, body = c.call("POST", "/predict", {"user_id": known, "input": q.input, "id": "q1"})
    assert code == 200, body
    assert body["id"] == "q1" and body["known_user"] and body["user_row"] == 1 and isinstance(body["prediction"], str)
    assert body["history_used"] == len(trained["histories"][known])  # the server's history store
    # Unknown user: row 0 (P_q only), from the history sent with the request (not stored).
    hist = [record("h1", "2021-01-01"), record("h2", "2021-02-01")]
    code, body = c.call("POST", "/predict", {"user_id": "stranger", "fields": {"text": "a story"}, "history": hist})
    assert code == 200, body
    assert (
        not body["known_user"] and body["user_row"] == 0 and body["history_used"] == 2 and body["history_stored"] == 0
    )
    # Deterministic: same request, same answer.
    again = c.call("POST", "/predict", {"user_id": "stranger", "fields": {"text": "a story"}, "history": hist})[1]
    assert again["prediction"] == body["prediction"]


def _delta(state: Path, generation: str, sequence: int) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(state / generation / "journal" / f"{sequence:08d}.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["rows"]  # nothing but the rows the feedback changed
        return f.get_tensor("rows"), json.loads(f.metadata()["delta"])


def test_feedback_changes_only_that_users_row_and_writes_one_delta(server, bundle, trained):
    c, state = server["client"], server["state"]
    model = server["app"].state.service.loaded.model
    user = trained["users"][1]
    before = load_file(bundle.path / "tapper" / "prefix.safetensors")
    last = max(r.date for r in trained["histories"][user]).isoformat()
    code, body = c.call(
        "POST",
        "/feedback",
        {"user_id": user, "records": [record("fb1", last, "sports"), record("fb2", "2026-01-01", "sports")]},
    )
    assert code == 200, body
    assert body["updated"] and body["report"]["users"] == [user] and body["report"]["steps"] == 3
    assert body["history_stored"] == len(trained["histories"][user]) + 2
    cur = json.loads((state / CURRENT_FILE).read_text())
    assert cur["generation"] == body["generation"] == "gen-000001" and body["sequence"] == 1
    gen = state / cur["generation"]
    # The first generation of a bundle starts from the bundle's own state: nothing of the model is copied.
    assert {p.name for p in gen.iterdir()} == {"meta.json", "journal"}
    assert json.loads((gen / "meta.json").read_text())["base"] == "bundle"
    assert [p.name for p in (gen / "journal").iterdir()] == ["00000001.safetensors"]  # nothing half-written left behind
    rows, meta = _delta(state, "gen-000001", 1)
    row = 1 + trained["users"].index(user)
    assert meta["users"] == [user] and meta["new_users"] == [] and rows.shape == (1, 8 * 128)
    assert [r["id"] for r in meta["records"][user]] == ["fb1", "fb2"]
    assert not torch.equal(rows[0], before[TABLE][row])
    after = model.state_tensors()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [TABLE]  # no shared tensor moved
    diff = {i for i in range(before[TABLE].shape[0]) if not torch.equal(before[TABLE][i], after[TABLE][i])}
    assert diff == {row} and torch.equal(after[TABLE][row], rows[0])
    assert c.call("GET", "/info")[1]["generation"] == "gen-000001"


def test_feedback_for_a_new_user_adds_a_row(server, trained):
    c, state = server["client"], server["state"]
    code, body = c.call(
        "POST", "/feedback", {"user_id": "newbie", "records": [record("n1", "2022-01-01"), record("n2", "2022-02-01")]}
    )
    assert code == 200, body
    assert body["report"]["new_users"] == ["newbie"] and body["user_row"] == len(trained["users"]) + 1
    rows, meta = _delta(state, body["generation"], body["sequence"])
    assert (
        meta["new_users"] == meta["users"] == ["newbie"] and rows[0].abs().sum() > 0
    )  # zero-initialised, then trained
    model = server["app"].state.service.loaded.model
    assert model.rows_in_use == len(trained["users"]) + 2 and model.user_ids[-1] == "newbie"
    assert not model.prefix.user_table.weight[model.rows_in_use :].any()  # spare rows stay zero
    code, pred = c.call("POST", "/predict", {"user_id": "newbie", "fields": {"text": "x"}})
    assert pred["known_user"] and pred["history_used"] == 2


def test_bad_input_is_422_naming_the_field(server):
    c = server["client"]
    cases = [
        ("/predict", {"input": "x"}, ["body", "user_id"]),
        ("/predict", {"user_id": "u", "input": "x", "date": "03/04/2021"}, ["body", "date"]),
        ("/predict", {"user_id": "u", "input": "x", "temperature": 2}, ["body", "temperature"]),
        ("/predict", {"user_id": "u"}, ["body", "input"]),
        ("/predict", {"user_id": "u", "fields": {"title": "t"}}, ["body", "fields", "text"]),
        (
            "/predict",
            {"user_id": "u", "input": "x", "history": [{"id": "h", "text": "t", "title": "t", "date": "2021-13-01"}]},
            ["body", "history", 0, "date"],
        ),
        ("/predict", {"user_id": "u", "input": "x", "max_new_tokens": 0}, ["body", "max_new_tokens"]),
        ("/feedback", {"user_id": "u", "records": []}, ["body", "records"]),
        (
            "/feedback",
            {"user_id": "u", "records": [{"id": "r", "text": "t", "title": "t"}]},
            ["body", "records", 0, "category"],
        ),
        (
            "/feedback",
            {"user_id": "u", "records": [{"text": "t", "title": "t", "category": "c"}]},
            ["body", "records", 0, "id"],
        ),
    ]
    for path, body, loc in cases:
        code, resp = c.call("POST", path, body)
        assert code == 422, (path, body, resp)
        assert loc in [e["loc"] for e in resp["detail"]], (loc, resp)
        assert ".".join(map(str, loc)) in resp["error"]
    # Feedback contradicting the stored history: 409 naming the field.
    ok = c.call("POST", "/feedback", {"user_id": "dup", "records": [record("d1", "2022-05-01")]})
    assert ok[0] == 200
    code, resp = c.call("POST", "/feedback", {"user_id": "dup", "records": [record("d1", "2022-06-01")]})
    assert code == 409 and resp["detail"][0]["loc"] == ["body", "records", 0, "id"]
    code, resp = c.call("POST", "/feedback", {"user_id": "dup", "records": [record("d2", "2022-04-01")]})
    assert code == 409 and resp["detail"][0]["loc"] == ["body", "records", 0, "date"]


def test_concurrent_feedback_and_predictions_are_serialized(server):
    """Parallel requests: every feedback lands in its own delta, no update is lost, predictions keep working."""
    from concurrent.futures import ThreadPoolExecutor

    c, state = server["client"], server["state"]
    start = server["app"].state.service.loaded.sequence
    users = [f"par{i}" for i in range(3)]
    jobs = [("POST", "/feedback", {"user_id": u, "records": [record(f"{u}-r", "2024-01-01")]}) for u in users]
    jobs += [("POST", "/predict", {"user_id": u, "fields": {"text": "x"}}) for u in users]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda j: c.call(*j), jobs))
    assert all(code == 200 for code, _ in results), results
    assert sorted(body["sequence"] for code, body in results[:3]) == [start + i for i in (1, 2, 3)]
    cur = json.loads((state / CURRENT_FILE).read_text())["generation"]
    written = [_delta(state, cur, start + i)[1]["new_users"] for i in (1, 2, 3)]
    assert sorted(u for new in written for u in new) == users


def test_restart_replica_sync_undo_and_reload(server, bundle, monkeypatch):
    """Restart and a second replica replay the journal; a failed write changes nothing; /reload works."""
    c, state = server["client"], server["state"]
    live = server["app"].state.service.loaded
    svc = TapperService(serve_config(model_dir=bundle.path, state_dir=state, feedback_steps=2, sync_seconds=0))
    ld = svc.load()  # a restarted server / another replica on the same state dir
    assert (ld.generation, ld.sequence) == (live.generation, live.sequence) and "newbie" in ld.model.user_rows
    assert ld.model.user_ids == live.model.user_ids
    assert torch.equal(ld.model.user_table_in_use().detach(), live.model.user_table_in_use().detach())
    assert {u: [r.id for r in h] for u, h in ld.histories.items()} == {
        u: [r.id for r in h] for u, h in live.histories.items()
    }

    # This replica takes a feedback; the HTTP server (the other replica) picks the delta up in the background.
    out = svc.feedback("replica-user", [svc_record("r1", "2023-01-01")])
    assert out["sequence"] == ld.sequence and out["generation"] == live.generation
    pred = wait_for(
        lambda: (lambda r: r if r["sequence"] == out["sequence"] else None)(
            c.call("POST", "/predict", {"user_id": "replica-user", "fields": {"text": "x"}})[1]
        ),
        what="the replica's delta",
    )
    assert pred["known_user"] and (pred["generation"], pred["sequence"]) == (out["generation"], out["sequence"])
    row = live.model.user_rows["replica-user"]
    assert torch.equal(live.model.prefix.user_table.weight[row], ld.model.prefix.user_table.weight[row])

    # Writing the delta fails: nothing on disk changes, the in-memory model is put back exactly.
    table = ld.model.user_table_in_use().detach().clone()
    n_users, seq = len(ld.model.user_ids), ld.sequence
    journal = sorted(p.name for p in (state / ld.generation / "journal").iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(LiveState, "write_delta", boom)
    for user in ("doomed-user", "replica-user"):  # a new user (its row is dropped) and a known one (its row restored)
        with pytest.raises(OSError):
            svc.feedback(user, [svc_record(f"z-{user}", "2023-02-01")])
    monkeypatch.undo()
    assert sorted(p.name for p in (state / ld.generation / "journal").iterdir()) == journal
    assert len(ld.model.user_ids) == n_users and "doomed-user" not in ld.model.user_rows and ld.sequence == seq
    assert torch.equal(ld.model.user_table_in_use().detach(), table)
    assert not ld.model.prefix.user_table.weight[
        ld.model.rows_in_use :
    ].any()  # the doomed user's row is spare (zero) again
    assert "doomed-user" not in ld.histories and [r.id for r in ld.histories["replica-user"]] == ["r1"]

    code, body = c.call("POST", "/reload", headers=ADMIN)
    assert code == 200 and (body["generation"], body["sequence"]) == (out["generation"], out["sequence"])
    assert body["model_version"] == "test-1"
    svc.close()


def test_compaction_pruning_and_a_new_bundle_carrying_histories(trained, bundle, tmp_path):
    """Every `compact_every` deltas the state becomes a snapshot generation (written in the background); a reader
    then adopts it; a journal with a gap is refused; a new bundle starts with the users' histories but not the
    old rows."""
    state = tmp_path / "state"
    cfg = dict(
        model_dir=bundle.path, state_dir=state, feedback_steps=1, sync_seconds=0, compact_every=2, keep_generations=2
    )
    writer, reader = TapperService(serve_config(**cfg)), TapperService(serve_config(**cfg))
    writer.load(), reader.load()
    outs = []
    for i in range(5):
        outs.append(writer.feedback(f"c{i}", [svc_record(f"c{i}-1", "2023-03-01")]))
        assert writer.compactor.wait_idle(60)
    assert [(o["generation"], o["sequence"], o["compaction"]) for o in outs] == [
        ("gen-000001", 1, None),
        ("gen-000001", 2, "scheduled"),
        ("gen-000002", 1, None),
        ("gen-000002", 2, "scheduled"),
        ("gen-000003", 1, None),
    ]
    assert writer.compactor.stats.history == ["gen-000002", "gen-000003"]
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("gen-")) == [
        "gen-000002",
        "gen-000003",
    ]  # pruned
    snap = state / "gen-000003"
    assert {p.name for p in snap.iterdir()} == {"meta.json", "journal", "tapper", "histories.jsonl", "updates.json"}
    assert json.loads((snap / "meta.json").read_text())["parent"] == "gen-000002"
    ld = reader.loaded
    # The reader syncs in the background: adopts the snapshot, then its one delta.
    wait_for(lambda: (ld.generation, ld.sequence) == ("gen-000003", 1), what="the reader's sync")
    assert reader.predict("c0", "a story")["sequence"] == 1 and ld.model.user_ids == writer.loaded.model.user_ids
    assert torch.equal(ld.model.user_table_in_use(), writer.loaded.model.user_table_in_use())
    assert set(ld.histories) == set(writer.loaded.histories)

    # A restart on the snapshot generation: the bundle's histories are never read, and users are converted
    # only as they are read (here, only the delta's user).
    resumed = TapperService(serve_config(**cfg)).load()
    assert resumed._bundle_histories is None and resumed.generation == "gen-000003"
    assert [r.id for r in resumed.histories["c4"]] == ["c4-1"] and resumed.histories.unread() == len(
        resumed.histories
    ) - 1

    # A journal with a hole (a delta file gone) is an error naming the file, not a silent skip.
    (snap / "journal" / "00000001.safetensors").rename(snap / "journal" / "00000002.safetensors")
    with pytest.raises(StateError, match="00000002.safetensors: journal gap"):
        TapperService(serve_config(**cfg)).load()
    (snap / "journal" / "00000002.safetensors").rename(snap / "journal" / "00000001.safetensors")

    # A new bundle: the old rows do not apply, the histories do; its first feedback snapshots them.
    b2 = export_bundle(
        trained["stage1"],
        trained["state"],
        "LaMP_2N",
        tmp_path / "b2",
        version="test-2",
        histories=trained["histories"],
    )
    fresh = TapperService(serve_config(**{**cfg, "model_dir": b2.path}))
    ld2 = fresh.load()
    assert (
        ld2.generation is None and "c4" not in ld2.model.user_rows and [r.id for r in ld2.histories["c4"]] == ["c4-1"]
    )
    out = fresh.feedback("c4", [svc_record("c4-2", "2023-04-01")])
    meta = json.loads((state / out["generation"] / "meta.json").read_text())
    assert meta["base"] == "snapshot" and meta["bundle_version"] == "test-2"
    restarted = TapperService(serve_config(**{**cfg, "model_dir": b2.path})).load()
    assert [r.id for r in restarted.histories["c4"]] == ["c4-1", "c4-2"] and "c4" in restarted.model.user_rows


def test_per_user_state_on_scratch_serves_feedback_compaction_and_reload_like_in_memory(bundle, trained, tmp_path):
    """--scratch-dir: the user table is a shared mapping of an unlinked scratch file and every history file read
    (the bundle's, snapshots') is spooled into an unlinked scratch file. The same feedbacks (known and new users,
    compactions) give bit-identical tables, the same histories and snapshot files, and the same predictions as a
    server without it; a restarted replica and /reload (adopting a snapshot generation) keep both on scratch."""
    import gc

    from deploy.histories.lines import _Unread
    from tapper.model.paged_table import is_paged
    from test_histories import spool_files

    def mapped(directory: Path) -> int:
        return sum(str(directory.resolve()) + "/" in line for line in open("/proc/self/maps"))

    def spooled_users(histories) -> int:
        return sum(isinstance(v, _Unread) and v.spool is not None for v in histories._users.values())

    common = dict(model_dir=bundle.path, feedback_steps=2, feedback_lr=0.05, sync_seconds=0, compact_every=2)
    scratch = tmp_path / "scratch" / "tapper"  # created when missing
    paged_cfg = serve_config(state_dir=tmp_path / "paged-state", scratch_dir=scratch, **common)
    plain_cfg = serve_config(state_dir=tmp_path / "plain-state", **common)
    with running(paged_cfg) as (pc, papp), running(plain_cfg) as (mc, mapp):
        assert pc.call("GET", "/info", headers=ADMIN)[1]["scratch_dir"] == str(scratch)
        assert mc.call("GET", "/info", headers=ADMIN)[1]["scratch_dir"] is None
        known = trained["users"][0]
        feedbacks = [
            (known, "2026-01-01"),
            ("pnew1", "2026-01-02"),
            (known, "2026-01-03"),
            ("pnew2", "2026-01-04"),
            ("pnew1", "2026-01-05"),
        ]
        for i, (user, date) in enumerate(feedbacks):
            body = {"user_id": user, "records": [record(f"p{i}", date, "sports")]}
            (pcode, pout), (mcode, mout) = pc.call("POST", "/feedback", body), mc.call("POST", "/feedback", body)
            assert pcode == mcode == 200, (pout, mout)
            assert papp.state.service.compactor.wait_idle(60) and mapp.state.service.compactor.wait_idle(60)
            assert (pout["generation"], pout["sequence"], pout["compaction"]) == (
                mout["generation"],
                mout["sequence"],
                mout["compaction"],
            )
            assert pout["history_stored"] == mout["history_stored"]
        assert pout["generation"] == "gen-000003"  # two compactions happened
        pld, mld = papp.state.service.loaded, mapp.state.service.loaded
        pm, mm = pld.model, mld.model
        assert is_paged(pm.prefix.user_table.weight) and not is_paged(mm.prefix.user_table.weight)
        assert pm.user_ids == mm.user_ids and torch.equal(pm.user_table_in_use(), mm.user_table_in_use())
        # The bundle's histories were spooled; users nobody gave feedback for are still only in the spool.
        assert spooled_users(pld.histories) == len(set(trained["histories"]) - {known}) > 0
        assert spooled_users(mld.histories) == 0 and pld.histories.to_json() == mld.histories.to_json()
        for gen in ("gen-000002", "gen-000003"):  # snapshots: unread users' lines copied back from the spool
            assert (tmp_path / "paged-state" / gen / "histories.jsonl").read_bytes() == (
                tmp_path / "plain-state" / gen / "histories.jsonl"
            ).read_bytes()
        for gen in (
            "gen-000001",
            "gen-000003",
        ):  # a bundle-based and a snapshot generation, as a new bundle carries them over
            carried = LiveState(tmp_path / "paged-state", spool_dir=scratch).histories(gen)
            assert (
                spooled_users(carried) > 0
                and carried.to_json() == LiveState(tmp_path / "plain-state").histories(gen).to_json()
            )
        for user in (known, "pnew1", "pnew2", "stranger"):
            req = {"user_id": user, "fields": {"text": "a story about the match"}}
            assert (
                pc.call("POST", "/predict", req)[1]["prediction"] == mc.call("POST", "/predict", req)[1]["prediction"]
            )

        # A restarted replica on the paged server's state: adopts the snapshot generation onto its own scratch dir.
        replica_svc = TapperService(
            serve_config(state_dir=tmp_path / "paged-state", scratch_dir=tmp_path / "replica-scratch", **common)
        )
        replica = replica_svc.load()
        assert (replica.generation, replica.sequence) == ("gen-000003", 1)
        assert is_paged(replica.model.prefix.user_table.weight) and mapped(tmp_path / "replica-scratch") == 1
        assert torch.equal(replica.model.user_table_in_use(), mm.user_table_in_use())
        assert spooled_users(replica.histories) > 0 and replica.histories.to_json() == mld.histories.to_json()
        assert len(spool_files(tmp_path / "replica-scratch")) == 1
        replica_svc.close()

        # /reload: a new model, paged from the start, then the snapshot; the old table's mapping and the old
        # histories' spools go with the old state.
        code, body = pc.call("POST", "/reload", headers=ADMIN)
        assert code == 200 and (body["generation"], body["sequence"]) == ("gen-000003", 1)
        reloaded = papp.state.service.loaded
        assert reloaded.model is not pm and is_paged(reloaded.model.prefix.user_table.weight)
        assert torch.equal(reloaded.model.user_table_in_use(), mm.user_table_in_use())
        assert spooled_users(reloaded.histories) > 0 and reloaded.histories.to_json() == mld.histories.to_json()
        del pm, pld, carried
        gc.collect()
        assert mapped(scratch) == 1 and list(scratch.iterdir()) == []  # no scratch file left on disk
        assert len(spool_files(scratch)) == 1 and all(f.endswith(" (deleted)") for f in spool_files(scratch))
        req = {"user_id": "pnew2", "fields": {"text": "another story"}}
        assert pc.call("POST", "/predict", req)[1]["prediction"] == mc.call("POST", "/predict", req)[1]["prediction"]
        # Feedback after the reload: a user still in the spool is read from it, updated and written at compaction.
        spooled_user = next(u for u, v in reloaded.histories._users.items() if isinstance(v, _Unread))
        body = {"user_id": spooled_user, "records": [record("after-reload", "2026-02-01", "sports")]}
        (pcode, pout), (mcode, mout) = pc.call("POST", "/feedback", body), mc.call("POST", "/feedback", body)
        assert pcode == mcode == 200 and pout["compaction"] == mout["compaction"] == "scheduled"
        assert papp.state.service.compactor.wait_idle(60) and mapp.state.service.compactor.wait_idle(60)
        assert (
            papp.state.service.compactor.stats.last_generation
            == mapp.state.service.compactor.stats.last_generation
            == "gen-000004"
        )
        assert pout["history_stored"] == mout["history_stored"]
        assert (tmp_path / "paged-state" / "gen-000004" / "histories.jsonl").read_bytes() == (
            tmp_path / "plain-state" / "gen-000004" / "histories.jsonl"
        ).read_bytes()


def test_a_malformed_stored_record_fails_only_its_users_requests(trained, tmp_path):
    """Histories are converted per user when first read: a hand-edited bundle with one bad record still loads,
    serves every other user, and answers that user's requests with a 500 naming the file, user, record and field."""
    b = export_bundle(
        trained["stage1"], trained["state"], "LaMP_2N", tmp_path / "b", version="bad-1", histories=trained["histories"]
    )
    lines = [json.loads(x) for x in b.histories_file.read_text().splitlines()]
    items = {line["user"]: line["records"] for line in lines}
    bad_user, good_user = sorted(items)[:2]
    bad_line = next(n for n, line in enumerate(lines, 1) if line["user"] == bad_user)
    items[bad_user][1]["date"] = "the day before yesterday"
    b.histories_file.write_text(
        "".join(json.dumps({"user": u, "records": r}, separators=(",", ":")) + "\n" for u, r in items.items())
    )
    cfg = serve_config(model_dir=b.path, state_dir=tmp_path / "live", feedback_steps=1, sync_seconds=0)
    with running(cfg) as (c, app):
        code, body = c.call("POST", "/predict", {"user_id": good_user, "fields": {"text": "a story"}})
        assert code == 200 and body["history_stored"] == len(items[good_user])
        for path, req in (
            ("/predict", {"user_id": bad_user, "fields": {"text": "a story"}}),
            ("/feedback", {"user_id": bad_user, "records": [record("late-1", "2026-01-01")]}),
        ):
            code, body = c.call("POST", path, req)
            assert code == 500, body
            assert body["error"].startswith(
                f"{b.histories_file} line {bad_line}, user {bad_user!r} record [1], field 'date'"
            )
        # Only the good user was converted; the bad one stays unread (and fails again on the next request).
        assert app.state.service.loaded.histories.unread() == len(items) - 1
        assert not (tmp_path / "live").exists() or not list(
            (tmp_path / "live").rglob("*.safetensors")
        )  # nothing written


def test_a_bundle_written_before_json_lines_still_serves_and_compacts_into_json_lines(trained, tmp_path):
    """Bundles and snapshots from before held one `histories.json` document; they load, and the next snapshot
    is written as `histories.jsonl` with the same histories."""
    b = export_bundle(
        trained["stage1"],
        trained["state"],
        "LaMP_2N",
        tmp_path / "old",
        version="old-1",
        histories=trained["histories"],
    )
    items = {line["user"]: line["records"] for line in map(json.loads, b.histories_file.read_text().splitlines())}
    (b.path / "histories.json").write_text(json.dumps(items))
    b.histories_file.unlink()
    assert read_bundle(b.path).histories_file.name == "histories.json"
    cfg = serve_config(model_dir=b.path, state_dir=tmp_path / "live", feedback_steps=1, sync_seconds=0, compact_every=1)
    svc = TapperService(cfg)
    svc.load()
    user = sorted(items)[0]
    assert svc.predict(user, "a story")["history_stored"] == len(items[user])
    out = svc.feedback(user, [svc_record("legacy-1", "2031-01-01")])
    assert out["compaction"] == "scheduled" and svc.compactor.wait_idle(60)
    snap = tmp_path / "live" / svc.compactor.stats.last_generation
    assert (snap / "histories.jsonl").is_file() and not (snap / "histories.json").exists()
    resumed = TapperService(cfg).load()
    assert set(resumed.histories) == set(items)
    assert [r.id for r in resumed.histories[user]] == [r["id"] for r in items[user]] + ["legacy-1"]
    other = sorted(items)[1]
    assert [r.id for r in resumed.histories[other]] == [r["id"] for r in items[other]]


# --- /metrics ----------------------------------------------------------------------------------------


def _scrape(client: Client, timeout: float = 10) -> dict[tuple[str, frozenset], float]:
    """GET /metrics (no token), parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(client.base + "/metrics", timeout=timeout) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _sample(scraped: dict, name: str, **labels) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


def test_metrics_count_what_was_done(bundle, trained, tmp_path, monkeypatch):
    """A fresh server (its own registry): predictions, a new user's feedback, a conflict, an invalid request and a
    /reload (refused without the token, then done) show up as exactly those counts; the model gauges follow the
    feedback; a scrape answers while the model lock is held; another app in this process counts nothing of it."""
    from prometheus_client import generate_latest

    from deploy.app import create_app

    cfg = serve_config(model_dir=bundle.path, state_dir=tmp_path / "live", feedback_steps=1, sync_seconds=0)
    with running(cfg) as (c, app):
        before = _scrape(c)
        assert _sample(before, "tapper_model_loaded") == 1
        assert _sample(before, "tapper_model_info", version="test-1", task="LaMP_2N", generation="none") == 1
        assert _sample(before, "tapper_users") == len(trained["users"])
        assert _sample(before, "tapper_users_with_history") == len(trained["histories"])
        assert _sample(before, "tapper_live_sequence") == 0 and _sample(before, "tapper_scratch_dir_enabled") == 0
        assert _sample(before, "tapper_model_age_seconds") >= 0
        assert (
            _sample(before, "tapper_process_anonymous_memory_bytes") > 0
            and _sample(before, "tapper_process_file_memory_bytes") > 0
        )
        assert _sample(before, "process_resident_memory_bytes") > 0  # the standard process collector, on this registry
        assert _sample(before, "tapper_requests_total", endpoint="/predict", status="200") is None
        assert _sample(before, "tapper_feedback_records_total") == 0 == _sample(before, "tapper_new_users_total")

        known, q = trained["users"][0], trained["evals"][0]
        for i in range(3):
            assert c.call("POST", "/predict", {"user_id": known, "input": q.input, "id": f"m{i}"})[0] == 200
        assert c.call("POST", "/predict", {"input": "no user"})[0] == 422
        fb = {"user_id": "metrics-newbie", "records": [record("mn1", "2022-01-01"), record("mn2", "2022-02-01")]}
        code, body = c.call("POST", "/feedback", fb)
        assert code == 200 and body["report"]["new_users"] == ["metrics-newbie"]
        assert (
            c.call("POST", "/feedback", {"user_id": "metrics-newbie", "records": [record("mn1", "2022-03-01")]})[0]
            == 409
        )
        assert Client(c.base, token=None).call("POST", "/reload")[0] == 401
        assert c.call("POST", "/reload")[0] == 403  # the API token is not the admin token
        assert _sample(_scrape(c), "tapper_model_loaded") == 1  # /metrics needs no token
        assert c.call("POST", "/reload", headers=ADMIN)[0] == 200

        # A scrape never waits for the model's locks (held here as a feedback update and a batch would hold them).
        svc = app.state.service
        with svc._writer_lock, svc.loaded.lock:
            started = time.monotonic()
            after = _scrape(c, timeout=5)
            assert time.monotonic() - started < 5

    def requests(endpoint: str, status: int) -> float | None:
        return _sample(after, "tapper_requests_total", endpoint=endpoint, status=str(status))

    assert requests("/predict", 200) == 3 and requests("/predict", 422) == 1
    assert requests("/feedback", 200) == 1 and requests("/feedback", 409) == 1
    assert requests("/reload", 401) == 1 and requests("/reload", 403) == 1 and requests("/reload", 200) == 1
    assert requests("/health", 200) >= 1  # the readiness polling of _running
    assert not [k for k in after if dict(k[1]).get("endpoint") == "/metrics"]  # scrapes are not counted
    assert _sample(after, "tapper_request_duration_seconds_count", endpoint="/predict") == 4
    assert _sample(after, "tapper_request_duration_seconds_sum", endpoint="/predict") > 0
    assert _sample(after, "tapper_request_duration_seconds_bucket", endpoint="/predict", le="+Inf") == 4
    assert _sample(after, "tapper_feedback_records_total") == 2 and _sample(after, "tapper_new_users_total") == 1
    # One batch per prediction here (they came one at a time); nothing waits, nothing was dropped or compacted.
    assert _sample(after, "tapper_batch_size_count") == 3 and _sample(after, "tapper_batch_size_sum") == 3
    assert _sample(after, "tapper_queue_wait_seconds_count") == 3 and _sample(after, "tapper_queue_depth") == 0
    assert _sample(after, "tapper_predictions_dropped_total") == 0
    assert (
        _sample(after, "tapper_compactions_total", result="done")
        == 0
        == _sample(after, "tapper_compactions_total", result="failed")
    )
    assert _sample(after, "tapper_users") == _sample(before, "tapper_users") + 1
    assert _sample(after, "tapper_users_with_history") == _sample(before, "tapper_users_with_history") + 1
    assert _sample(after, "tapper_live_sequence") == 1
    assert _sample(after, "tapper_model_info", version="test-1", task="LaMP_2N", generation="gen-000001") == 1
    assert _sample(after, "tapper_model_info", version="test-1", task="LaMP_2N", generation="none") is None
    assert _sample(after, "tapper_process_anonymous_memory_bytes") > 0

    other = create_app(cfg)  # another app in this process: its own registry, none of the numbers above
    assert b"tapper_requests_total{" not in generate_latest(other.state.metrics.registry)


def test_metrics_answer_without_a_loaded_model(tmp_path):
    """No model loaded (here: the startup load never ran): /metrics is still 200, with the request counts, the
    process gauges and tapper_model_loaded 0, and without the model's gauges."""
    cfg = serve_config(model_dir=tmp_path / "no-bundle", state_dir=tmp_path / "live")
    with running(cfg, lifespan="off", ready=503) as (c, app):
        assert c.call("POST", "/predict", {"user_id": "u", "input": "x"})[0] == 503
        scraped = _scrape(c)
    assert _sample(scraped, "tapper_model_loaded") == 0
    assert _sample(scraped, "tapper_requests_total", endpoint="/predict", status="503") == 1
    assert _sample(scraped, "tapper_requests_total", endpoint="/health", status="503") >= 1
    assert _sample(scraped, "tapper_process_anonymous_memory_bytes") > 0
    names = {name for name, _ in scraped}
    assert not names & {
        "tapper_users",
        "tapper_users_with_history",
        "tapper_live_sequence",
        "tapper_model_info",
        "tapper_model_age_seconds",
        "tapper_scratch_dir_enabled",
    }


def test_cli_registers_serve_and_bundle(bundle, tmp_path, monkeypatch):
    from tapper.cli import build_parser

    args = build_parser().parse_args(["serve", "--model-dir", str(bundle.path), "--port", "9999"])
    assert args.func.__name__ == "cmd_serve" and args.port == 9999 and args.scratch_dir is None
    args = build_parser().parse_args(["serve", "--model-dir", str(bundle.path), "--scratch-dir", str(tmp_path / "s")])
    assert args.scratch_dir == str(tmp_path / "s")
    monkeypatch.setenv("TAPPER_SCRATCH_DIR", str(tmp_path / "from-env"))
    assert ServeConfig.from_env(model_dir=bundle.path).scratch_dir == tmp_path / "from-env"
    assert ServeConfig.from_env(model_dir=bundle.path, scratch_dir=tmp_path / "flag").scratch_dir == tmp_path / "flag"
    monkeypatch.delenv("TAPPER_SCRATCH_DIR")
    assert ServeConfig.from_env(model_dir=bundle.path).scratch_dir is None
    args = build_parser().parse_args(
        [
            "bundle",
            "--stage1",
            str(bundle.stage1_dir),
            "--state",
            str(bundle.state_dir),
            "--task",
            "LaMP_2N",
            "--out",
            str(tmp_path / "b2"),
            "--version",
            "7",
        ]
    )
    assert args.func(args) == 0 and read_bundle(tmp_path / "b2").version == "7"


def test_publish_bundle_swaps_a_symlink(bundle, tmp_path):
    from deploy.bundle import publish_bundle

    link = tmp_path / "current"
    publish_bundle(bundle.path, link)
    assert link.is_symlink() and read_bundle(link).version == "test-1"
    publish_bundle(bundle.path, link)  # replacing is a rename over the old link
    assert [p.name for p in tmp_path.iterdir()] == ["current"]
    with pytest.raises(BundleError):
        publish_bundle(tmp_path, tmp_path / "other")  # not a bundle: never published


def _mlflow_artifacts(trained, tmp_path, with_backbone: bool) -> dict:
    ref = tmp_path / "backbone.json"
    ref.write_text(json.dumps({"task": "LaMP_2N", "uri": str(trained["stage1"]), "spec": "tiny", "weights_hash": ""}))
    arts = {"tapper_state": str(trained["state"]), "backbone_ref": str(ref)}
    if with_backbone:
        arts["stage1_backbone"] = str(trained["stage1"])
    return arts


def test_bundle_from_an_mlflow_pyfunc_model(trained, tmp_path):
    """The pyfunc layout steps/register.py logs (pipelines/mlflow_model.py + artifacts) becomes a bundle."""
    import mlflow

    from deploy.bundle import bundle_from_mlflow_dir

    mlflow.pyfunc.save_model(
        str(tmp_path / "model"),
        python_model=str(Path(__file__).parents[1] / "pipelines" / "mlflow_model.py"),
        artifacts=_mlflow_artifacts(trained, tmp_path, True),
        pip_requirements=["tapper"],
        metadata={"task": "LaMP_2N", "zenml_model_version": "5"},
    )
    info = bundle_from_mlflow_dir(tmp_path / "model", tmp_path / "bundle")
    assert info.task == "LaMP_2N" and info.version == "5"
    assert (info.state_dir / "prefix.safetensors").read_bytes() == (
        trained["state"] / "prefix.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_bundle_from_the_mlflow_registry_alias(trained, tmp_path):
    """models:/<name>@production from a real (SQLite) MLflow registry; the backbone found through backbone.json."""
    import mlflow

    from deploy.bundle import bundle_from_mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("serving-test")
        with mlflow.start_run():
            mi = mlflow.pyfunc.log_model(
                name="tapper",
                python_model=str(Path(__file__).parents[1] / "pipelines" / "mlflow_model.py"),
                artifacts=_mlflow_artifacts(trained, tmp_path, False),
                registered_model_name="tapper-test",
                pip_requirements=["tapper"],
                metadata={"task": "LaMP_2N"},
            )
        mlflow.MlflowClient().set_registered_model_alias("tapper-test", "production", mi.registered_model_version)
        info = bundle_from_mlflow("models:/tapper-test@production", tmp_path / "bundle")
    finally:
        mlflow.set_tracking_uri(previous)
    assert info.version == f"tapper-test/{mi.registered_model_version}"
    assert info.meta["source"]["mlflow_model_uri"] == "models:/tapper-test@production"
