"""The core's defects (issue 17), each pinned by a test that failed before the fix, plus regression numbers."""

from __future__ import annotations


import pytest
import torch

from model_fixtures import TASK, tiny_examples
from tapper.methods.retrieval import retrieve
from tapper.config import Stage2Config
from tapper.data.types import Example, Record
from tapper.experiment import PreparedData, tokenizer_corpus
from tapper.data.splits import Splits
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.prefix import PrefixEncoder
from tapper.model.tapper import TapPer
from tapper.train.features import FeatureEncoder, bm25_keep, time_gaps
from tapper.train.row_adam import RowAdamW
from tapper.train.stage2 import encoder_for, fit, param_groups


def fresh(backbone):
    """A private copy of the backbone: TapPer attaches its bridge LoRA in place."""
    from tapper.model.backbone import load_backbone_dir

    return load_backbone_dir(backbone.path).model


@pytest.fixture(scope="module")
def data():
    return tiny_examples()


def test_query_vector_is_made_from_the_querys_content_not_the_template(backbone, cache, data):
    _, evals, _ = data
    enc = FeatureEncoder(TASK, backbone.tokenizer, cache, max_len=128).encode(evals, progress=False)
    for ex, it in zip(evals, enc.items):
        content = TASK.query_content(ex.input)
        assert content == ex.input.split(" article: ", 1)[1]
        assert torch.equal(enc.vectors[it.q_row], cache.encode([content], progress=False)[0])
    # Before: the mean of the whole templated input; two queries' vectors were nearly the same.
    q = torch.stack([enc.vectors[it.q_row] for it in enc.items])
    templated = cache.encode([ex.input for ex in evals], progress=False)
    cos = lambda v: torch.nn.functional.cosine_similarity(v[0:1], v[1:]).mean()
    assert cos(q) < cos(templated)


def test_bm25_prefilter_keeps_what_rag_retrieves():
    hist = [
        Record(id=f"r{j}", fields={"text": w, "title": "", "category": c})
        for j, (w, c) in enumerate(
            [
                ("alpha beta", "sports"),
                ("gamma", "travel"),
                ("beta zeta", "religion"),
                ("delta travel", "crime"),
                ("eta", "sports"),
                ("theta", "sports"),
            ]
        )
    ]
    ex = Example(id="x", user_id="u", input=TASK.make_input(text="alpha beta"), target=None, history=hist)
    keep = bm25_keep(ex, TASK, 2)
    assert keep == sorted(hist.index(r) for r in retrieve(TASK, ex, 2)) == [0, 2]
    # The label names of the template are not searched: "travel" is one of them, yet r3 is not kept.
    assert 3 not in keep


def test_user_table_moves_only_the_rows_a_batch_visited():
    table = torch.nn.Parameter(torch.randn(5, 3))
    before = table.detach().clone()
    opt = RowAdamW([{"params": [table], "lr": 0.1, "weight_decay": 0.5}])
    for rows in ([1, 2], [1], [3]):
        opt.zero_grad()
        table[rows].pow(2).sum().backward()
        opt.step()
    after = table.detach()
    assert torch.equal(after[0], before[0]) and torch.equal(after[4], before[4])  # never visited: bit-identical
    assert not torch.equal(after[2], before[2])
    # Row 2 was visited once: its later steps (momentum, decay) did not move it again.
    lone = torch.nn.Parameter(before.clone())
    once = RowAdamW([{"params": [lone], "lr": 0.1, "weight_decay": 0.5}])
    lone[[1, 2]].pow(2).sum().backward()
    once.step()
    assert torch.equal(after[2], lone.detach()[2])


def test_stage2_groups_train_the_user_table_row_sparsely(backbone, data):
    train, _, users = data
    model = TapPer(fresh(backbone), users, Stage2Config())
    groups = param_groups(model, model.cfg)
    assert [g["rows"] for g in groups] == [True, False, False, False]


def test_time_gaps_follow_one_rule_for_training_and_evaluation(data):
    train, evals, _ = data
    last_train = [ex for ex in train if ex.user_id == evals[0].user_id][-1]
    for ex in (last_train, evals[0]):
        dt, _ = time_gaps(ex)
        assert dt[-1] == 0.0  # the newest record, whatever date the example carries
    # Before: a training example was measured from its own (later) date, so its newest record was >= 1 day old.
    assert last_train.query_date > last_train.history[-1].date


def test_pq_of_an_empty_history_is_the_same_alone_or_batched():
    torch.manual_seed(0)
    enc = PrefixEncoder(3, 8, Stage2Config(prefix_len=2, use_pu=False), emb_std=1.0)
    zq = torch.randn(2, 8)
    zh = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])
    dt = torch.zeros(2, 4)
    batched, _ = enc(torch.zeros(2, dtype=torch.long), zq, zh, mask, dt, dt)
    alone, _ = enc(torch.zeros(1, dtype=torch.long), zq[1:], zh[1:, :0], mask[1:, :0], dt[1:, :0], dt[1:, :0])
    torch.testing.assert_close(batched[1:], alone)
    assert batched[1].abs().sum() > 0  # proj(average user), not zero


def test_an_unknown_user_in_evaluation_is_an_error(backbone, cache, data):
    _, evals, users = data
    enc = FeatureEncoder(TASK, backbone.tokenizer, cache, max_len=128, prefix_len=8)
    rows = {u: i + 1 for i, u in enumerate(users[1:])}
    with pytest.raises(KeyError, match=f"user '{users[0]}' has no row"):
        enc.encode(evals, rows, progress=False)
    served = enc.encode(evals, rows, progress=False, unknown_users="pq_only")
    assert served.items[0].user_row == 0


def test_a_target_longer_than_the_budget_is_cut_and_the_prompt_kept(backbone):
    enc = FeatureEncoder(TASK, backbone.tokenizer, None, max_len=40, prefix_len=8)
    p, t = enc.tokenize("news " * 50, "word " * 100)
    assert len(p) + len(t) + 8 <= 40 and len(p) >= 16 and t[-1] == backbone.tokenizer.eos_token_id


def test_embedding_cache_key_includes_max_tokens(backbone, tmp_path):
    a = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer, max_tokens=512)
    b = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer, max_tokens=4)
    assert a.dir != b.dir


def test_tiny_tokenizer_never_sees_evaluation_golds():
    ex = Example(id="q", user_id="u", input=TASK.make_input(text="x"), target="zzgoldzz", history=[])
    tr = Example(id="t", user_id="u", input=TASK.make_input(text="y"), target="travel", history=[])
    data = PreparedData(task=TASK, splits=Splits([], ["u"], [], [tr], [ex]), n_users=1, n_records=0)
    texts = tokenizer_corpus(data)
    assert not any("zzgoldzz" in t for t in texts) and any("travel" in t for t in texts)


# --- regression numbers (fixed seeds) ----------------------------------------------------------


def test_prefix_encoder_forward_is_pinned():
    torch.manual_seed(0)
    enc = PrefixEncoder(2, 4, Stage2Config(prefix_len=2, din_hidden=4, proj_hidden=4), emb_std=0.5)
    zq, zh = torch.randn(2, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    enc.fit_input_stats(torch.cat([zq, zh.reshape(-1, 4)]), [0, 1], [[2, 3, 4], [5, 6]])
    P, alpha = enc(
        torch.tensor([1, 2]),
        zq,
        zh,
        mask,
        torch.tensor([[2.0, 1, 0], [1, 0, 0]]),
        torch.tensor([[3.0, 2, 1], [2, 1, 0]]),
    )
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2))
    expected = torch.tensor([-0.1293, 0.3975, 0.8568, 0.5413])
    torch.testing.assert_close(P[0, 0], expected, atol=1e-4, rtol=0)


def test_padded_loss_equals_the_token_weighted_per_example_loss(backbone, cache, data):
    train, _, users = data
    model = TapPer(fresh(backbone), users, Stage2Config(prefix_len=4))
    model.eval()
    enc = encoder_for(model, TASK, backbone.tokenizer, cache).encode(train[:6], model.user_rows, progress=False)
    pad = backbone.tokenizer.pad_token_id
    with torch.no_grad():
        batched = model.loss(enc.items, enc.vectors, pad)
        per = [(model.loss([it], enc.vectors, pad), len(it.target_ids)) for it in enc.items]
    weighted = sum(loss * n for loss, n in per) / sum(n for _, n in per)
    torch.testing.assert_close(batched, weighted, atol=1e-5, rtol=1e-5)


def test_batched_and_one_at_a_time_generation_agree(backbone, cache, data):
    from tapper.eval.predict import generate_texts

    _, evals, users = data
    model = TapPer(fresh(backbone), users, Stage2Config(prefix_len=4))
    enc = encoder_for(model, TASK, backbone.tokenizer, cache).encode(evals, model.user_rows, progress=False)
    together = generate_texts(model, enc, backbone.tokenizer, TASK, batch_size=len(evals), progress=False)
    alone = generate_texts(model, enc, backbone.tokenizer, TASK, batch_size=1, progress=False)
    assert together == alone


def test_a_few_stage2_steps_give_a_pinned_loss_curve(backbone, cache, data):
    from tapper.train.loop import set_seed

    train, _, users = data
    set_seed(0)
    cfg = Stage2Config(prefix_len=4, epochs=3, lr=1e-3, batch_size=8)
    model = TapPer(fresh(backbone), users, cfg)
    enc = encoder_for(model, TASK, backbone.tokenizer, cache).encode(train, model.user_rows, progress=False)
    model.prefix.fit_input_stats(enc.vectors, [it.q_row for it in enc.items], [it.hist_rows for it in enc.items])
    losses = fit(model, enc, backbone.tokenizer.pad_token_id, cfg, cfg.epochs, seed=0, progress=False)
    assert losses == pytest.approx([39.1788, 38.5073, 37.1319], abs=2e-3)
