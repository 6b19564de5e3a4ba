"""Issue 21, item 3: the hot paths, each pinned by a test that failed before its fix.

Backbone hash from the weight files, one embedding cache per run, embedding_bag pooling, BM25 built once per
user, length-sorted generation, the DIN's split first layer, vectors resident on the model's device.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rank_bm25 import BM25Okapi

from model_fixtures import TASK, tiny_examples
from tapper.config import Stage2Config
from tapper.data import bm25
from tapper.data.types import Example, Record
from tapper.model.backbone import load_backbone_dir, tensor_hash, weights_hash
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.tapper import TapPer
from tapper.train.features import FeatureEncoder
from tapper.train.stage2 import encoder_for


@pytest.fixture(scope="module")
def data():
    return tiny_examples()


# --- the backbone hash ----------------------------------------------------------------------------------------


def test_backbone_hash_reads_the_weight_files_not_the_tensors(backbone, tmp_path):
    bb = load_backbone_dir(backbone.path)

    def refuse(*a, **k):
        raise AssertionError("the weights hash read the model's tensors")

    bb.model.state_dict = refuse  # before: weights_hash(model) walked model.state_dict()
    first = bb.weights_hash
    assert first == weights_hash(backbone.path) == load_backbone_dir(backbone.path).weights_hash
    # Bytes, not dates: a copy of the directory has the same hash.
    copy = tmp_path / "copy"
    shutil.copytree(backbone.path, copy)
    assert weights_hash(copy) == first
    # A changed weight byte changes it (a file rewritten with the same size).
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert weights_hash(copy) != first
    with pytest.raises(TypeError):
        weights_hash(bb.model)


def test_stage1_records_the_hash_of_the_directory_it_saved(backbone, data, tmp_path):
    from tapper.config import Stage1Config
    from tapper.train.stage1 import train_stage1

    train, _, _ = data
    bb = load_backbone_dir(backbone.path)
    res = train_stage1(bb, TASK, train[:4], Stage1Config(epochs=1, batch_size=4), tmp_path / "s1", progress=False)
    # Serving checks a bundle's backbone with the loaded directory's hash: the two must be the same thing.
    assert res.weights_hash == load_backbone_dir(res.path).weights_hash
    assert res.weights_hash != tensor_hash(load_backbone_dir(res.path).model)


# --- one embedding cache per run ------------------------------------------------------------------------------


def test_an_experiment_opens_one_embedding_cache_for_all_its_variants(tmp_path, monkeypatch):
    import tapper.experiment as experiment
    from tapper.config import load_run_config
    from workflow_data import make_lamp_2n

    q, o = make_lamp_2n(tmp_path / "data", users=5, records=4, queries=1)
    opened = []
    real_init = EmbeddingCache.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingCache, "__init__", counting_init)
    cfg = load_run_config(
        {"stage2_users": 2}, ["stage1.epochs=1", "stage1.max_examples=16", "stage2.epochs=1", "eval.max_new_tokens=2"]
    )
    report = experiment.run_experiment(
        None, q, o, "tiny", tmp_path / "run", cfg, ["base", "tap-per", "no-pu"], progress=False
    )
    assert set(report["variants"]) == {"base", "tap-per", "no-pu"}
    # Before: one for the base, two (training, evaluation) per TAP-PER variant: five.
    assert len(opened) == 1
    # Outside a run each call still opens its own.
    bb = load_backbone_dir(tmp_path / "run" / "stage1")
    assert experiment.embedding_cache(bb, tmp_path / "c") is not experiment.embedding_cache(bb, tmp_path / "c")


# --- embedding_bag pooling ------------------------------------------------------------------------------------


def test_embedding_bag_vectors_equal_the_padded_mean(backbone, data, tmp_path):
    train, evals, _ = data
    texts = [TASK.record_text(r) for ex in evals for r in ex.history] + ["", "x"]
    cache = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer, max_tokens=16)
    got = cache._mean_embed(texts)
    # The padded form it replaced.
    enc = backbone.tokenizer(
        texts, add_special_tokens=False, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = backbone.model.get_input_embeddings().weight.detach().float()
    padded = (emb[enc["input_ids"]] * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    torch.testing.assert_close(got, padded, atol=1e-6, rtol=0)
    assert torch.equal(got[texts.index("")], torch.zeros(emb.shape[1]))


def test_pooling_does_not_build_a_padded_token_tensor(backbone, data, tmp_path, monkeypatch):
    """Before: emb[input_ids] built [texts, longest, d]; now each row is read once, by embedding_bag."""
    train, evals, _ = data
    texts = [TASK.record_text(r) for ex in evals for r in ex.history]
    cache = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer)
    seen = []
    real = F.embedding_bag

    def spy(*args, **kwargs):
        seen.append(args[0].numel())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "embedding_bag", spy)
    cache._mean_embed(texts)
    n_tokens = sum(len(backbone.tokenizer(t, add_special_tokens=False)["input_ids"][:512]) for t in texts)
    assert seen == [n_tokens]


# --- BM25 built once per user ---------------------------------------------------------------------------------

WORDS = "the a of news sport game team vote law court film music star rain storm city".split()


def _corpus(rng: random.Random, n: int) -> list[str]:
    # Frequent words ("the", "a") get negative idfs, so the ε floor is exercised; some records are empty.
    return [
        "" if rng.random() < 0.05 else " ".join(rng.choice(WORDS[:3] * 4 + WORDS) for _ in range(rng.randint(1, 12)))
        for _ in range(n)
    ]


def test_bm25_index_scores_equal_rank_bm25_bit_for_bit():
    rng = random.Random(0)
    texts = _corpus(rng, 60)
    index = bm25.Bm25Index()
    for trial in range(200):
        docs = [rng.randrange(len(texts)) for _ in range(rng.randint(1, 40))]  # any subset, repeats included
        query = bm25.bm25_tokens(" ".join(rng.choice(WORDS + ["unknown"]) for _ in range(rng.randint(0, 6))))
        got = index.scores(query, [index.doc(texts[d]) for d in docs])
        corpus = [bm25.bm25_tokens(texts[d]) or ["<empty>"] for d in docs]
        want = BM25Okapi(corpus).get_scores(query) if query else np.zeros(len(docs))
        assert np.array_equal(got, want), trial


def _user_examples(n: int) -> list[Example]:
    """One user's Stage-2-like examples: the i-th sees the records before it."""
    rng = random.Random(1)
    records = [
        Record(id=f"r{j}", fields={"title": "", "text": t, "category": "sports"}) for j, t in enumerate(_corpus(rng, n))
    ]
    return [
        Example(
            id=f"e{i}",
            user_id="u",
            input=TASK.make_input(text=records[i].fields["text"] or "vote"),
            target="sports",
            history=records[:i],
        )
        for i in range(n)
    ]


def test_bm25_prefilter_tokenizes_each_record_once_per_user(backbone, cache, monkeypatch):
    examples = _user_examples(40)
    want = [
        sorted(bm25.rank(TASK, ex.input, ex.history)[:3]) if len(ex.history) > 3 else list(range(len(ex.history)))
        for ex in examples
    ]
    calls = []
    real = bm25.bm25_tokens

    def counting(text):
        calls.append(text)
        return real(text)

    monkeypatch.setattr(bm25, "bm25_tokens", counting)
    enc = FeatureEncoder(TASK, backbone.tokenizer, cache, max_len=128, bm25_k=3).encode(examples, progress=False)
    # Same records kept as a fresh BM25 per example would keep...
    assert [[int(h[1:]) for h in it.history_ids] for it in enc.items] == want
    # ...with each record tokenized once (before: once per example that saw it, ~n²/2), plus one query each.
    searched = sum(len(ex.history) > 3 for ex in examples)
    assert len(calls) <= (len(examples) - 1) + searched


def test_rag_retrieval_tokenizes_each_record_once_per_user(backbone, monkeypatch):
    from tapper.methods.prompted import encode_augmented
    from tapper.methods.retrieval import retrieve

    examples = _user_examples(30)
    want = [[r.id for r in retrieve(TASK, ex, 2)] for ex in examples]
    calls = []
    real = bm25.bm25_tokens
    monkeypatch.setattr(bm25, "bm25_tokens", lambda t: calls.append(t) or real(t))
    encoded, augmented = encode_augmented(TASK, backbone.tokenizer, examples, 2, 128)
    assert [[r.id for r in augmented[ex.id].records] for ex in examples] == want
    assert len(calls) <= (len(examples) - 1) + len(examples)


# --- length-sorted generation ---------------------------------------------------------------------------------


def test_generation_batches_are_length_sorted_and_outputs_keep_the_input_order(backbone, cache, data):
    from tapper.eval.predict import generate_texts

    _, evals, users = data
    model = TapPer(load_backbone_dir(backbone.path).model, users, Stage2Config(prefix_len=4))
    # Prompts of very different lengths, shuffled.
    rng = random.Random(0)
    varied = [
        Example(
            id=f"{ex.id}-{k}",
            user_id=ex.user_id,
            input=TASK.make_input(text=" ".join(["word"] * (3 + 7 * k))),
            target=None,
            history=ex.history,
        )
        for ex in evals
        for k in range(3)
    ]
    rng.shuffle(varied)
    enc = encoder_for(model, TASK, backbone.tokenizer, cache).encode(varied, model.user_rows, progress=False)
    batches = []
    real = model.generate

    def spy(items, *args, **kwargs):
        batches.append([len(it.prompt_ids) for it in items])
        return real(items, *args, **kwargs)

    model.generate = spy
    preds = generate_texts(model, enc, backbone.tokenizer, TASK, batch_size=4, progress=False)
    lengths = [n for b in batches for n in b]
    assert lengths == sorted(lengths, reverse=True)  # before: the input order, every batch padded to its longest
    assert list(preds) == [it.id for it in enc.items]
    model.generate = real
    alone = generate_texts(model, enc, backbone.tokenizer, TASK, batch_size=1, progress=False)
    assert preds == alone


# --- the DIN's first layer ------------------------------------------------------------------------------------


def test_din_split_first_layer_equals_the_concatenated_form():
    from tapper.model.prefix import PrefixEncoder

    torch.manual_seed(0)
    d = 16
    enc = PrefixEncoder(3, d, Stage2Config(prefix_len=2, din_hidden=24), emb_std=1.0).double()
    torch.nn.init.normal_(enc.din[-1].weight)  # the output layer starts at zero; make the scores differ
    zq, zh = torch.randn(5, d).double(), torch.randn(5, 7, d).double()
    mask = torch.rand(5, 7) < 0.8
    mask[:, 0] = True
    dt, dpi = torch.rand(5, 7).double() * 10, torch.arange(7, 0, -1).double().expand(5, 7)
    alpha = enc.attention(zq, zh, mask, dt, dpi)
    q, h = enc.query_in(zq).unsqueeze(1).expand_as(zh), enc.records_in(zh)
    s = enc.din(torch.cat([q, h, q - h, q * h], dim=-1)).squeeze(-1)  # the paper's [B, N, 4d] form
    s = s - enc.lambda_t * torch.log1p(dt) - enc.lambda_o * torch.log1p(dpi)
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(alpha, want, atol=1e-12, rtol=0)


# --- vectors resident on the device ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on the CPU the vectors are always resident")
def test_training_and_generation_gather_from_vectors_on_the_models_device(backbone, cache, data):
    from tapper.eval.predict import generate_texts
    from tapper.train.stage2 import fit

    train, evals, users = data
    model = TapPer(load_backbone_dir(backbone.path, device="cuda").model, users, Stage2Config(prefix_len=4))
    devices = []
    real = model.prefix_for

    def spy(items, vectors):
        devices.append(vectors.device)
        return real(items, vectors)

    model.prefix_for = spy
    enc = encoder_for(model, TASK, backbone.tokenizer, cache).encode(train[:8], model.user_rows, progress=False)
    fit(model, enc, backbone.tokenizer.pad_token_id, model.cfg, 1, 0, progress=False)
    generate_texts(model, enc, backbone.tokenizer, TASK, batch_size=4, progress=False)
    assert devices and all(d.type == "cuda" for d in devices)
