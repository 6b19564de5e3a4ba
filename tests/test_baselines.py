"""Baselines (issue 4): each is tested for what makes it that baseline.

RAG: exactly k records, all from the user's own history, never the query's own record, fitting max_len.
PAG: the profile is generated once per user and cached.
OPPU: one adapter per user, trained only on that user's examples, different across users.
P_q-only: nothing stored per user.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest
import torch
from safetensors.torch import load_file

from model_fixtures import TASK, corpus, tiny_examples
from tapper.methods import REGISTRY, check_variants, pag, rag
from tapper.methods.oppu import OppuConfig, train_user_adapters
from tapper.methods.profile import ProfileConfig, ProfileWriter
from tapper.methods.prompted import PromptSpec, encode_augmented
from tapper.methods.retrieval import FORMATS, augment, format_records, retrieve
from tapper.data.bm25 import search_query
from tapper.config import Stage2Config
from tapper.data.tasks import get_task
from tapper.data.types import Example, Record
from tapper.model.backbone import load_backbone, load_backbone_dir
from tapper.model.tapper import TapPer

MARK = "the category for the article:"


@pytest.fixture(scope="module")
def data():
    # Users whose records mention distinct words, so that BM25 has something to find.
    train, evals, users = tiny_examples(n_users=4, n_hist=6)
    return train, evals, users


@pytest.fixture(scope="module")
def backbone(data):
    train, evals, _ = data
    return load_backbone("tiny", texts=corpus(train, evals) + ["alpha beta gamma delta " * 3])


def test_every_issue_variant_is_registered():
    names = "base,rag-k1,rag-k2,rag-k4,pag-k0,pag-k1,oppu,oppu-rag,oppu-pag,pq-only,tap-per".split(",")
    check_variants(names)
    families = {n: REGISTRY.family(n) for n in names}
    assert families["rag-k4"] == "rag" and families["pag-k0"] == "pag" and families["oppu-pag"] == "oppu"
    assert families["pq-only"] == families["tap-per"] == "tap-per" and families["base"] == "base"
    assert rag.spec("rag-k4") == PromptSpec(4, False) and pag.spec("pag-k0") == PromptSpec(0, True)
    with pytest.raises(ValueError):
        check_variants(["rag-kx"])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_rag_prompt_holds_exactly_k_records_of_the_users_own_history(data, backbone, k):
    train, evals, users = data
    for ex in evals + [t for t in train if len(t.history) >= k]:
        aug = augment(TASK, ex, k, backbone.tokenizer, max_len=256)
        own = {r.id for r in ex.history}
        ids = [r.id for r in aug.records]
        assert len(ids) == k == len(set(ids))
        assert set(ids) <= own and ex.source_record_id not in ids
        assert aug.text.count(MARK) == k
        for r in aug.records:
            assert f'is "{r.fields["category"]}"' in aug.text
        # No other user's record is written in (record texts read "news item j of <user>").
        assert not any(f'of {v}"' in aug.text for v in users if v != ex.user_id)
        assert f'of {ex.user_id}"' in aug.text
        assert aug.text.endswith(ex.input)


def test_rag_never_retrieves_the_querys_own_record(backbone):
    hist = [
        Record(
            id=f"r{j}",
            fields={"text": f"alpha beta {j}", "title": "t", "category": "sports"},
            date=dt.date(2020, 1, 1 + j),
        )
        for j in range(3)
    ]
    own = hist[1]
    # A history that (wrongly) contains the record the example was made from: it must still be skipped,
    # even though it matches the query best.
    ex = Example(
        id="x",
        user_id="u",
        input=TASK.make_input(text=own.fields["text"]),
        target="sports",
        history=hist,
        source_record_id=own.id,
    )
    for k in (1, 2, 4):
        assert own.id not in [r.id for r in retrieve(TASK, ex, k)]
    assert len(retrieve(TASK, ex, 4)) == 2  # only what the history holds, minus the own record


def test_rag_ranks_by_bm25_on_the_article_text():
    hist = [
        Record(id=f"r{j}", fields={"text": w, "title": "", "category": "sports"})
        for j, w in enumerate(["gamma gamma", "alpha beta alpha", "delta"])
    ]
    ex = Example(id="x", user_id="u", input=TASK.make_input(text="alpha beta"), target=None, history=hist)
    assert search_query(TASK, ex.input) == "alpha beta"  # the instruction and label list are not the query
    assert [r.id for r in retrieve(TASK, ex, 1)] == ["r1"]


def test_rag_truncates_records_to_fit_max_len(backbone):
    long = " ".join(["alpha beta gamma delta"] * 80)
    hist = [Record(id=f"r{j}", fields={"text": long, "title": "t", "category": "sports"}) for j in range(4)]
    ex = Example(id="x", user_id="u", input=TASK.make_input(text="alpha beta"), target="sports", history=hist)
    enc, aug = encode_augmented(TASK, backbone.tokenizer, [ex], 4, max_len=128)
    it = enc.items[0]
    assert len(it.prompt_ids) + len(it.target_ids) <= 128
    text = backbone.tokenizer.decode(it.prompt_ids)
    assert text.count(MARK) == 4 and "Answer:" in text and aug["x"].text.endswith(ex.input)


@pytest.mark.parametrize("task_name", sorted(FORMATS))
def test_lamp_record_sentences(backbone, task_name):
    task = get_task(task_name)
    fields = {f: f"{f}-value" for f in ("text", "title", "category", "description", "tag", "abstract")}
    fields["score"] = "4"
    rec = Record(id="r", fields=fields)
    (sentence,) = format_records(task, [rec], backbone.tokenizer, budget=200)
    expected = {
        "LaMP_1": '"title-value"',
        "LaMP_2N": 'the category for the article: "text-value" is "category-value" ',
        "LaMP_2M": 'the tag for the movie: "description-value" is "tag-value" ',
        "LaMP_3": '4 is the score for "text-value" ',
        "LaMP_4": '"title-value" is the title for "text-value" ',
        "LaMP_5": '"title-value" is a title for "abstract-value" ',
        "LaMP_6": '"title-value" is the title for "text-value" ',
        "LaMP_7": '"text-value" ',
    }[task_name]
    assert sentence == expected


def test_lamp1_titles_go_after_the_papers_title(backbone):
    task = get_task("LaMP_1")
    inp = task.make_input(title="My paper", ref1="Ref one", ref2="Ref two")
    hist = [Record(id="a", fields={"title": "Ref one study", "abstract": "x"})]
    hist += [Record(id=f"b{j}", fields={"title": f"other {j}", "abstract": "y"}) for j in range(3)]
    aug = augment(task, Example(id="q", user_id="u", input=inp, target="[1]", history=hist), 1, backbone.tokenizer, 256)
    assert 'title "My paper", and "Ref one study", which reference' in aug.text


def test_pag_profiles_are_written_once_per_history_and_cached(data, backbone, tmp_path):
    _, evals, users = data
    cfg = ProfileConfig(n_records=3, max_new_tokens=6)
    writer = ProfileWriter(backbone.model, backbone.tokenizer, "w", cfg, root=tmp_path)
    histories = {ex.id: ex.history for ex in evals}
    first = writer.profiles(TASK, histories)
    assert set(first) == {ex.id for ex in evals} and writer.generated == len(users)
    again = ProfileWriter(backbone.model, backbone.tokenizer, "w", cfg, root=tmp_path)
    assert again.profiles(TASK, histories) == first and again.generated == 0 and again.reused == len(users)
    enc, aug = encode_augmented(TASK, backbone.tokenizer, evals, 1, 256, first)
    for ex in evals:
        assert aug[ex.id].text.startswith("user profile: ") and aug[ex.id].text.count(MARK) == 1


@pytest.fixture(scope="module")
def oppu_run(data, backbone, tmp_path_factory):
    train, evals, _ = data
    store = tmp_path_factory.mktemp("oppu")
    ocfg = OppuConfig(epochs=1, lr=1e-2, batch_size=4, max_len=128)
    run = train_user_adapters(
        load_backbone_dir(backbone.path).model,
        backbone.tokenizer,
        TASK,
        train,
        evals,
        PromptSpec(k=1, profile=False),
        ocfg,
        seed=0,
        store=store,
        progress=False,
    )
    return run, store, ocfg


def test_oppu_trains_each_adapter_on_its_own_users_data_only(data, oppu_run):
    train, evals, users = data
    run, _, _ = oppu_run
    assert set(run.users) == set(users)
    for u, adapter in run.users.items():
        own = {ex.id for ex in train if ex.user_id == u}
        assert adapter.seen_ids == own and adapter.n_examples == len(own)
    assert set(run.predictions) == {ex.id for ex in evals}
    # Every eval prompt carries one retrieved record of the user's own (oppu-rag).
    own_hist = {ex.id: {r.id for r in ex.history} for ex in evals}
    assert all(len(ids) == 1 and set(ids) <= own_hist[i] for i, ids in run.prompts.items())


def test_oppu_adapters_differ_per_user_and_are_stored(data, oppu_run, backbone):
    run, store, ocfg = oppu_run
    index = json.loads((store / "index.json").read_text())
    states = {u: load_file(store / "users" / info["file"]) for u, info in index["users"].items()}
    assert set(states) == set(run.users)
    keys = next(iter(states.values())).keys()
    assert keys and all("lora_" in k for k in keys)
    # The paper's Appendix A.4: OPPU gets TAP-PER's own targets, q, k, v and o (OPPU's code had q, v only).
    assert {t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if any(t in k for k in keys)} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    users = list(states)
    for a in range(len(users)):
        for b in range(a + 1, len(users)):
            assert any(not torch.equal(states[users[a]][k], states[users[b]][k]) for k in keys if "lora_B" in k)
    # Per-user parameter count = the real LoRA modules: r * (in + out) for q, k, v, o in every block.
    c = backbone.model.config
    head = c.hidden_size // c.num_attention_heads
    q = o = ocfg.r * (c.hidden_size + c.num_attention_heads * head)
    k = v = ocfg.r * (c.hidden_size + c.num_key_value_heads * head)
    per_block = q + k + v + o
    assert run.per_user_params == per_block * c.num_hidden_layers == index["per_user_params"]
    assert sum(v.numel() for v in states[users[0]].values()) == run.per_user_params


def test_oppu_pag_training_profiles_never_see_the_record_they_predict(data, backbone):
    """Before: one profile per user from the full history, also used for the user's training examples."""
    from tapper.methods.prompted import make_profiles

    train, evals, _ = data
    query = evals[-1]
    last = [ex for ex in train if ex.user_id == query.user_id][-1]  # made from the user's latest record
    profiles, writer = make_profiles(
        backbone.model, backbone.tokenizer, TASK, [last, query], cfg=ProfileConfig(n_records=3, max_new_tokens=4)
    )
    assert set(profiles) == {last.id, query.id}
    latest = query.history[-1].fields["text"]
    prompts = [json.loads(p.read_text())["prompt"] for p in writer.dir.glob("*.json")]
    prompts = [p for p in prompts if f"of {query.user_id}" in p]
    # Two profiles: the query's holds the latest record, the training example's (made from it) does not.
    assert len(prompts) == 2 and sum(latest in p for p in prompts) == 1


def test_oppu_user_adapter_does_not_depend_on_other_users(data, oppu_run, backbone):
    """Training a user alone gives bitwise the same adapter: nothing leaks from earlier users."""
    train, evals, _ = data
    run, store, ocfg = oppu_run
    last = evals[-1].user_id
    alone_store = store.parent / "alone"
    alone = train_user_adapters(
        load_backbone_dir(backbone.path).model,
        backbone.tokenizer,
        TASK,
        train,
        [e for e in evals if e.user_id == last],
        PromptSpec(k=1, profile=False),
        ocfg,
        seed=0,
        store=alone_store,
        progress=False,
    )
    a = load_file(alone.users[last].path)
    b = load_file(run.users[last].path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stored_numel(model: TapPer) -> int:
    return sum(v.numel() for v in model.state_tensors().values())


def test_pq_only_reports_no_per_user_parameters(backbone):
    m = TapPer(load_backbone_dir(backbone.path).model, ["a", "b"], Stage2Config(use_pu=False))
    assert m.per_user_params() == 0 and not m.trainable_parameters()["user_table"]


def test_pq_only_stores_nothing_per_user(backbone):
    few = TapPer(load_backbone_dir(backbone.path).model, ["a", "b"], Stage2Config(use_pu=False))
    many = TapPer(load_backbone_dir(backbone.path).model, [f"u{i}" for i in range(50)], Stage2Config(use_pu=False))
    assert _stored_numel(few) == _stored_numel(many)


def test_tapper_stores_L_times_d_per_user(backbone):
    cfg = Stage2Config()
    few = TapPer(load_backbone_dir(backbone.path).model, ["a", "b"], cfg)
    more = TapPer(load_backbone_dir(backbone.path).model, ["a", "b", "c"], dataclasses.replace(cfg))
    assert _stored_numel(more) - _stored_numel(few) == cfg.prefix_len * few.d == few.per_user_params()


def test_experiment_cli_runs_baselines_into_metrics_and_predictions(tmp_path):
    """`tapper experiment --variants ...` evaluates exactly the named baselines on one split (issue 4, item 6)."""
    from tapper.cli import main
    from workflow_data import make_lamp_2n

    q, o = make_lamp_2n(tmp_path / "data", users=5, records=4, queries=1)
    out = tmp_path / "run"
    rc = main(
        [
            "experiment",
            "--questions",
            str(q),
            "--outputs",
            str(o),
            "--out",
            str(out),
            "--stage2-users",
            "2",
            "--variants",
            "rag-k1,pag-k0,oppu",
            "--no-progress",
            "--set",
            "stage1.epochs=1",
            "--set",
            "stage1.max_examples=16",
            "--set",
            "stage2.epochs=1",
            "--set",
            "eval.max_new_tokens=3",
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["rag-k1", "pag-k0", "oppu"]
    assert metrics["pending"] == [] and metrics["files"] == {"questions": str(q), "outputs": str(o)}
    assert {p.name for p in (out / "predictions").iterdir()} == {"rag-k1.json", "pag-k0.json", "oppu.json"}
    assert metrics["params"]["oppu"]["per_user"] > 0 and metrics["params"]["rag-k1"]["per_user"] == 0
    golds = json.loads((out / "predictions" / "oppu.json").read_text())["golds"]
    assert len(golds) == metrics["data"]["eval_queries"]
    assert len(list((out / "oppu" / "oppu" / "users").glob("*.safetensors"))) == 2
    audit = json.loads((out / "baselines" / "rag-k1" / "prompts.json").read_text())
    assert all(len(ids) == 1 for ids in audit["retrieved"].values())


def test_experiment_stopped_midway_keeps_the_metrics_of_finished_variants(tmp_path, monkeypatch):
    """metrics.json is rewritten after each variant: a run killed hours in keeps what it finished."""
    import tapper.experiment as experiment
    from tapper.config import load_run_config
    from workflow_data import make_lamp_2n

    q, o = make_lamp_2n(tmp_path / "data", users=5, records=4, queries=1)
    real = experiment.run_variant

    def stop_at_second(variant, *args, **kwargs):
        if variant == "pag-k0":
            raise KeyboardInterrupt  # what a Ctrl-C or a kill during the second variant looks like
        return real(variant, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_variant", stop_at_second)
    cfg = load_run_config({"stage2_users": 2}, ["stage1.epochs=1", "stage1.max_examples=16", "eval.max_new_tokens=3"])
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(
            None, q, o, "tiny", tmp_path / "run", cfg, ["rag-k1", "pag-k0", "oppu"], progress=False
        )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["rag-k1"] and metrics["pending"] == ["pag-k0", "oppu"]
    assert 0.0 <= metrics["variants"]["rag-k1"]["accuracy"] <= 1.0
