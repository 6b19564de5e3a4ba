"""Online adaptation: what each update touches, the streaming split, and the simulation's trajectories."""

from __future__ import annotations

import json

import pytest
import torch

from model_fixtures import TASK, tiny_examples
from tapper.builders.synthetic import build_synthetic
from tapper.config import ConfigError, RunConfig, Stage2Config
from tapper.experiment import prepare_data
from tapper.model.backbone import load_backbone_dir
from tapper.model.tapper import TapPer
from tapper.online import (
    OnlineConfig,
    add_users,
    feedback_examples,
    load_online_config,
    simulate,
    split_chunks,
    stream_split,
    update_users,
)

# --- update_users: exactly the parameters each mode may change -----------------------------------


@pytest.fixture(scope="module")
def data():
    return tiny_examples(n_users=6, n_hist=4)


def fresh_model(backbone, users, **cfg) -> TapPer:
    torch.manual_seed(0)
    model = TapPer(load_backbone_dir(backbone.path).model, users, Stage2Config(lr=1e-2, batch_size=4, **cfg))
    # The bridge's B starts at zero (so A gets no gradient); make the adapter do something.
    with torch.no_grad():
        for p in model.bridge_parameters():
            p.normal_(std=0.02)
    return model


def snapshot(model: TapPer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, model: TapPer) -> set[str]:
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return {i for i in range(before.shape[0]) if not torch.equal(before[i], after[i])}


TABLE = "prefix.user_table.weight"


def test_online_emb_changes_only_the_affected_rows(backbone, cache, data):
    train, _, users = data
    model = fresh_model(backbone, users)
    before = snapshot(model)
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    affected = ["user1", "user3"]
    rep = update_users(
        model, TASK, backbone.tokenizer, cache, [ex for ex in train if ex.user_id in affected], "emb", epochs=2, seed=0
    )
    assert changed(before, model) == {TABLE}  # nothing but the user table: no DIN, projection, λ, bridge, backbone
    rows = {model.user_rows[u] for u in affected}
    assert changed_rows(before[TABLE], model.prefix.user_table.weight) == rows  # other rows (and row 0) bit-identical
    assert rep.users == affected and rep.new_users == [] and rep.steps == 4 and rep.n_examples == 8
    assert rep.params_touched == 2 * model.per_user_params()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before  # freezing is undone


def test_online_full_changes_rows_shared_and_bridge_never_the_backbone(backbone, cache, data):
    train, _, users = data
    model = fresh_model(backbone, users)
    before = snapshot(model)
    rep = update_users(
        model, TASK, backbone.tokenizer, cache, [ex for ex in train if ex.user_id == "user2"], "full", steps=3, seed=0
    )
    diff = changed(before, model)
    assert all(k.startswith("prefix.") or "lora_" in k for k in diff), diff  # the backbone never moves
    assert any(k.startswith("prefix.din") for k in diff) and any(k.startswith("prefix.proj") for k in diff)
    assert {"prefix.lambda_t_raw", "prefix.lambda_o_raw"} <= diff
    assert any("lora_A" in k for k in diff) and any("lora_B" in k for k in diff)
    assert changed_rows(before[TABLE], model.prefix.user_table.weight) == {model.user_rows["user2"]}
    assert rep.steps == 3
    shared = sum(p.numel() for k in ("shared", "lambdas", "bridge") for p in model.trainable_parameters()[k])
    assert rep.params_touched == model.per_user_params() + shared


def test_new_user_gets_a_new_row_and_row0_stays_unknown(backbone, cache, data, tmp_path):
    train, _, users = data
    model = fresh_model(backbone, users[:4])
    before = snapshot(model)
    newcomer = [ex for ex in train if ex.user_id == "user5"]
    rep = update_users(model, TASK, backbone.tokenizer, cache, newcomer, "emb", epochs=1, seed=0)
    table = model.prefix.user_table.weight
    assert rep.new_users == ["user5"] and model.user_rows["user5"] == 5 == model.rows_in_use - 1
    assert not table[5 + 1 :].any()  # the room the table grew by is spare: zero
    assert torch.equal(table[:5], before[TABLE]) and not (table[0] != 0).any()  # old rows and the zero row 0 unchanged
    assert (table[5] != 0).any()  # started at zero (= unknown user), moved by the update
    assert add_users(model, ["user5", "user0"]) == []
    # The grown model saves and reloads like any other.
    model.save(tmp_path / "state")
    reloaded = TapPer.load(tmp_path / "state", load_backbone_dir(backbone.path).model)
    assert reloaded.user_rows == model.user_rows and torch.equal(reloaded.prefix.user_table.weight, table[:6].detach())
    assert reloaded.prefix.user_table.num_embeddings == 6  # spare rows are not saved


def test_new_users_take_spare_rows_and_the_table_is_copied_rarely(backbone):
    """A full table grows by a quarter (at least 64 rows), so most new users cost one row, not a table copy."""
    model = fresh_model(backbone, ["a", "b"])
    trained = model.user_table_in_use().detach().clone()
    reallocations = 0
    for i in range(200):
        before = model.prefix.user_table
        add_users(model, [f"n{i}"])
        reallocations += model.prefix.user_table is not before
    assert model.rows_in_use == 203 and model.user_rows["n199"] == 202
    assert reallocations == 4  # 3 -> 67 -> 131 -> 195 -> 259 rows: four reallocations for 200 new users
    assert model.prefix.user_table.num_embeddings == 259
    assert torch.equal(model.user_table_in_use()[:3], trained) and not model.user_table_in_use()[3:].any()
    assert model.state_tensors()["prefix.user_table.weight"].shape[0] == 203


def test_online_emb_refuses_a_model_without_pu(backbone, cache, data):
    train, _, users = data
    model = fresh_model(backbone, users, use_pu=False)
    with pytest.raises(ValueError, match="P_u"):
        update_users(model, TASK, backbone.tokenizer, cache, train[:2], "emb")


def test_feedback_examples_see_everything_before_them(data):
    train, evals, _ = data
    hist = evals[0].history  # user0's 4 records
    exs = feedback_examples(TASK, "user0", hist[:2], hist[2:])
    assert [ex.source_record_id for ex in exs] == [r.id for r in hist[2:]]
    assert [len(ex.history) for ex in exs] == [2, 3]


# --- the streaming split --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    build_synthetic(root, users=10, history=(8, 11), seed=1)
    return root


def test_split_chunks_sizes():
    assert [len(c) for c in split_chunks(list(range(13)), 5)] == [3, 3, 3, 2, 2]
    assert sum(split_chunks(list(range(13)), 5), []) == list(range(13))
    assert [len(c) for c in split_chunks([1, 2], 5)] == [1, 1, 0, 0, 0]


def test_stream_chunks_are_chronological_and_disjoint(synth):
    data = prepare_data(None, synth / "questions.json", synth / "outputs.json", stage2_users=4)
    split = stream_split(data, 3)
    assert split.fractions == [0.5, 0.6667, 0.8333, 1.0]
    for u in split.users:
        s = split.streams[u]
        full = {r.id: r for ex in data.splits.eval if ex.user_id == u for r in ex.history}
        pieces = [s.bootstrap] + s.chunks
        ids = [r.id for p in pieces for r in p]
        assert len(ids) == len(set(ids)) == len(full)  # disjoint and complete
        assert len(s.bootstrap) == len(full) // 2
        sizes = [len(c) for c in s.chunks]
        assert max(sizes) - min(sizes) <= 1
        # Each piece ends no later than the next begins: the stream arrives in time order.
        nonempty = [p for p in pieces if p]
        for a, b in zip(nonempty, nonempty[1:]):
            assert max(r.date for r in a) <= min(r.date for r in b)
        for t, chunk in enumerate(s.chunks, start=1):
            chunk_ids = {r.id for r in chunk}
            step = [ex for ex in split.examples[t] if ex.user_id == u]
            assert {ex.source_record_id for ex in step} == chunk_ids
            absorbed_before = [r.id for r in s.absorbed(t - 1)]
            for ex in step:  # an example sees exactly what came before it
                assert [r.id for r in ex.history][: len(absorbed_before)] == absorbed_before
        for t in range(split.n_chunks + 1):
            seen = {r.id for r in s.absorbed(t)}
            assert all({r.id for r in ex.history} <= seen for ex in split.eval_examples(t) if ex.user_id == u)
    # Stage-2 training data at 100% is exactly the usual Stage-2 training set.
    assert sorted(ex.id for ex in split.seen_examples(3)) == sorted(ex.id for ex in data.splits.stage2_train)


def test_online_config_rejects_unknown_keys_and_splits_sections():
    cfg, ocfg = load_online_config(
        {"stage2": {"epochs": 2}}, ["online.chunks=3", "online.methods=[static, online-emb]", "seed=4"]
    )
    assert isinstance(cfg, RunConfig) and cfg.stage2.epochs == 2 and cfg.seed == 4
    assert ocfg.chunks == 3 and ocfg.methods == ["static", "online-emb"]
    with pytest.raises(ConfigError, match="unknown key"):
        load_online_config({}, ["online.chunk=3"])
    with pytest.raises(ConfigError):
        OnlineConfig(methods=["static", "oracle"])
    with pytest.raises(ConfigError):
        OnlineConfig(eval_history="future")


# --- the simulation ---------------------------------------------------------------------------------


def test_simulation_trajectories_flat_static_and_repeatable(synth, tmp_path, capsys):
    from tapper.cli import main

    args = [
        "online",
        "--questions",
        str(synth / "questions.json"),
        "--outputs",
        str(synth / "outputs.json"),
        "--backbone",
        "tiny",
        "--stage2-users",
        "3",
        "--no-progress",
        "--set",
        "stage1.skip=true",
        "--set",
        "stage2.epochs=1",
        "--set",
        "stage2.lr=0.01",
        "--set",
        "stage2.batch_size=8",
        "--set",
        "online.chunks=2",
        "--set",
        "online.lr_emb=0.05",
    ]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "trajectories.json").read_text())
    # Even under --no-progress, each method and chunk is announced as it is scored.
    step_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[online] ")]
    assert len(step_lines) == 4 * 3 and "online-full t=2 (100% of history absorbed): accuracy=" in "\n".join(step_lines)
    assert (tmp_path / "a" / "online.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["metric"] == "accuracy" and report["fractions"] == [0.5, 0.75, 1.0]
    methods = report["methods"]
    assert list(methods) == ["static", "online-emb", "online-full", "full-retrain"]
    assert all(len(v) == 3 for v in methods.values())
    assert len({v[0] for v in methods.values()}) == 1  # one bootstrap checkpoint, one R_0
    assert len(set(methods["static"])) == 1 and report["cost"]["static"]["params_touched_per_chunk"] == 0
    cost = report["cost"]
    assert 0 < cost["online-emb"]["params_touched_per_chunk"] < cost["online-full"]["params_touched_per_chunk"]
    assert [c["steps"] for c in cost["online-emb"]["per_chunk"]] == [
        c["steps"] for c in cost["online-full"]["per_chunk"]
    ]
    # The end points paired on the same queries: the mean difference is the difference of the final scores.
    paired = report["final_paired"]
    assert list(paired) == [
        "online-emb - static",
        "online-full - static",
        "full-retrain - static",
        "full-retrain - online-full",
    ]
    for pair, st in paired.items():
        a, b = pair.split(" - ")
        assert (
            st["mean"] == pytest.approx(methods[a][-1] - methods[b][-1])
            and st["queries"] == report["split"]["eval_queries"]
        )
        assert st["ci95"][0] <= st["mean"] <= st["ci95"][1]

    # Same seed, same trajectory (the Stage-1 directory of the first run is reused: Stage 1 is skipped anyway).
    cfg, ocfg = load_online_config(
        {
            "stage2_users": 3,
            "stage1": {"skip": True},
            "stage2": {"epochs": 1, "lr": 1e-2, "batch_size": 8},
            "online": {"chunks": 2, "lr_emb": 0.05, "methods": ["online-emb", "online-full"]},
        }
    )
    data = prepare_data(None, synth / "questions.json", synth / "outputs.json", 3)
    again = simulate(tmp_path / "a" / "stage1", data, cfg, ocfg, tmp_path / "b", progress=False)
    for m in ("online-emb", "online-full"):
        assert again["all_metrics"][m] == report["all_metrics"][m]
        assert [c["losses"] for c in again["cost"][m]["per_chunk"]] == [
            c["losses"] for c in report["cost"][m]["per_chunk"]
        ]
        a = TapPer.load(
            tmp_path / "a" / "final" / m, load_backbone_dir(tmp_path / "a" / "stage1").model
        ).state_tensors()
        b = TapPer.load(
            tmp_path / "b" / "final" / m, load_backbone_dir(tmp_path / "a" / "stage1").model
        ).state_tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), m
