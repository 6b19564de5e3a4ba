"""The TAP-PER model on the tiny backbone: LoRA targets and merge, trainable set, cache, checkpoints, switches."""

from __future__ import annotations

import math

import pytest
import torch

from model_fixtures import TASK, tiny_examples
from tapper.config import Stage1Config, Stage2Config
from tapper.model.backbone import load_backbone_dir
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.lora import LoraTargetError, attach_lora, merge_lora
from tapper.model.prefixed_lm import PrefixedLM
from tapper.model.tapper import TapPer
from tapper.train.features import bm25_keep, lm_train_batch, time_gaps
from tapper.train.stage1 import tokenize_examples, train_stage1
from tapper.train.stage2 import encoder_for, train_stage2
from tapper.eval.predict import generate_texts


@pytest.fixture(scope="module")
def data():
    return tiny_examples()


@pytest.fixture(scope="module")
def stage1_dir(backbone, data, tmp_path_factory):
    train, _, _ = data
    fresh = load_backbone_dir(backbone.path)
    res = train_stage1(
        fresh,
        TASK,
        train,
        Stage1Config(epochs=1, batch_size=8),
        tmp_path_factory.mktemp("s1") / "merged",
        progress=False,
    )
    return res.path


def test_lora_targets_every_block_and_rejects_unmatched(backbone):
    model = load_backbone_dir(backbone.path).model
    peft_model = attach_lora(model, 8, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    n_layers = model.config.num_hidden_layers
    lora_names = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.endswith("proj")}
    assert len(lora_names) == 4 * n_layers
    # The authors' `out_proj` does not exist in Llama: PEFT would drop it silently; we refuse.
    with pytest.raises((LoraTargetError, ValueError)):
        attach_lora(load_backbone_dir(backbone.path).model, 8, 8, 0.0, ["q_proj", "out_proj"])


def test_merged_and_unmerged_outputs_agree(backbone, data):
    train, _, _ = data
    model = load_backbone_dir(backbone.path).model
    peft_model = attach_lora(model, 8, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # B starts at zero; make the adapter do something
            p.data.normal_(std=0.05)
    items = tokenize_examples(TASK, backbone.tokenizer, train[:4], 128)
    batch = lm_train_batch(items, backbone.tokenizer.pad_token_id)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        merged = merge_lora(peft_model)
        after = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_merge_refuses_non_finite_weights(backbone):
    peft_model = attach_lora(
        load_backbone_dir(backbone.path).model, 8, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.fill_(float("nan"))
            break
    with pytest.raises(FloatingPointError):
        merge_lora(peft_model)


def test_stage1_changes_attention_only(backbone, stage1_dir):
    before = load_backbone_dir(backbone.path).model.state_dict()
    after = load_backbone_dir(stage1_dir).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    # The embedding matrix is untouched, so cached record vectors stay valid after Stage 1.
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_only_prefix_and_bridge_get_gradients(stage1_dir, data, tmp_path):
    train, _, users = data
    bb = load_backbone_dir(stage1_dir)
    model = TapPer(bb.model, users, Stage2Config())
    cache = EmbeddingCache(tmp_path, bb.model, bb.tokenizer)
    enc = encoder_for(model, TASK, bb.tokenizer, cache).encode(train, model.user_rows, progress=False)
    model.train()
    model.loss(enc.items[:8], enc.vectors, bb.tokenizer.pad_token_id).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    requires = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = lambda n: n.startswith("prefix.") or "lora_" in n  # noqa: E731
    assert requires and all(allowed(n) for n in requires)
    assert with_grad <= requires
    assert any("lora_" in n for n in with_grad) and any(n.startswith("prefix.user_table") for n in with_grad)
    assert any(n.startswith("prefix.din") for n in with_grad) and any(n.startswith("prefix.proj") for n in with_grad)
    # The backbone's own weights never require grad.
    assert not any(p.requires_grad for n, p in model.named_parameters() if not allowed(n))


def test_lambdas_stay_non_negative(stage1_dir):
    bb = load_backbone_dir(stage1_dir)
    model = TapPer(bb.model, ["a"], Stage2Config())
    with torch.no_grad():
        model.prefix.lambda_t_raw.fill_(-50.0)
    assert float(model.prefix.lambda_t) >= 0.0
    off = TapPer(load_backbone_dir(stage1_dir).model, ["a"], Stage2Config(use_lambda_t=False, use_lambda_o=False))
    assert float(off.prefix.lambda_t) == 0.0 and float(off.prefix.lambda_o) == 0.0


def test_attention_is_masked_and_sums_to_one(stage1_dir):
    bb = load_backbone_dir(stage1_dir)
    model = TapPer(bb.model, ["a", "b"], Stage2Config())
    d = model.d
    zq, zh = torch.randn(2, d) * 0.02, torch.randn(2, 5, d) * 0.02
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    dt, dpi = torch.rand(2, 5) * 30, torch.arange(5, 0, -1).float().expand(2, 5)
    alpha = model.prefix.attention(zq, zh, mask, dt, dpi)
    assert torch.allclose(alpha[0].sum(), torch.tensor(1.0)) and (alpha[0, 3:] == 0).all()
    assert (alpha[1] == 0).all()  # no history: no weight, no NaN


def test_embedding_cache_second_run_computes_nothing(backbone, data, tmp_path):
    train, _, _ = data
    texts = [TASK.record_text(r) for ex in train for r in ex.history]
    first = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer)
    v1 = first.encode(texts, progress=False)
    assert first.stats.computed == len(set(texts))
    second = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer)
    v2 = second.encode(texts, progress=False)
    assert second.stats.computed == 0 and second.stats.reused == len(texts)
    assert torch.equal(v1, v2)
    # The vector is the mean of the frozen input-embedding rows of the text's tokens.
    ids = backbone.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    emb = backbone.model.get_input_embeddings().weight.detach()
    assert torch.allclose(v1[0], emb[ids].mean(0), atol=1e-6)


def test_embedding_cache_appends_shards_without_rewriting_and_survives_a_crash(backbone, data, tmp_path, monkeypatch):
    """An append writes only its new rows; a crash before the manifest leaves the previous state."""
    import tapper.model.embedding_cache as ec

    train, evals, _ = data
    texts = list(dict.fromkeys(TASK.record_text(r) for ex in train + evals for r in ex.history))
    first_half, second_half = texts[: len(texts) // 2], texts[len(texts) // 2 :]
    cache = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer)
    v1 = cache.encode(first_half, progress=False)
    shard1 = sorted(cache.dir.glob("shard-*.safetensors"))
    assert len(shard1) == 1
    stamp = shard1[0].stat()
    cache.encode(second_half, progress=False)
    shards = sorted(cache.dir.glob("shard-*.safetensors"))
    assert len(shards) == 2 and shard1[0].stat().st_mtime_ns == stamp.st_mtime_ns  # old shard untouched
    assert len(cache.store.known()) == len(texts)

    # A write that dies after the shard but before the manifest: the shard is ignored, nothing is lost.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ec, "atomic_write_json", crash)
    with pytest.raises(OSError):
        EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer).encode(["a text never seen"], progress=False)
    monkeypatch.undo()
    again = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer)
    assert len(again) == len(texts)
    assert torch.equal(again.encode(first_half, progress=False), v1) and again.stats.computed == 0


def test_embedding_cache_compacts_and_reads_the_first_format(backbone, tmp_path, monkeypatch):
    import json

    from safetensors.torch import save_file

    import tapper.model.embedding_cache as ec

    monkeypatch.setattr(ec, "MAX_SHARDS", 3)
    cache = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer)
    texts = [f"record number {i}" for i in range(5)]
    for t in texts:
        cache.encode([t], progress=False)
    # Appends 1-3 made three shards; the 4th compacted them into one; the 5th added a second.
    assert len(json.loads((cache.dir / "manifest.json").read_text())["shards"]) == 2
    assert len(list(cache.dir.glob("shard-*.safetensors"))) == 2  # the compacted-away files are gone
    expected = cache.encode(texts, progress=False)
    reread = EmbeddingCache(tmp_path, backbone.model, backbone.tokenizer)
    assert torch.equal(reread.encode(texts, progress=False), expected) and reread.stats.computed == 0

    # A cache in the first format (one matrix + index.json, rows past the index from a torn write).
    legacy_dir = tmp_path / "legacy"
    legacy = EmbeddingCache(legacy_dir, backbone.model, backbone.tokenizer)
    for f in legacy.dir.iterdir():
        f.unlink()
    save_file(
        {"vectors": torch.cat([expected[:3], torch.ones(1, expected.shape[1])]).contiguous()},
        legacy.dir / "vectors.safetensors",
    )
    (legacy.dir / "index.json").write_text(json.dumps({ec.text_hash(t): i for i, t in enumerate(texts[:3])}))
    old = EmbeddingCache(legacy_dir, backbone.model, backbone.tokenizer)
    assert len(old) == 3 and torch.equal(old.encode(texts[:3], progress=False), expected[:3])
    old.encode(texts, progress=False)  # the next append converts it
    assert not (old.dir / "index.json").exists() and len(list(old.dir.glob("shard-*.safetensors"))) == 1
    converted = EmbeddingCache(legacy_dir, backbone.model, backbone.tokenizer)
    assert torch.equal(converted.encode(texts, progress=False), expected) and converted.stats.computed == 0


def test_time_gaps_and_bm25_prefilter(data):
    _, evals, _ = data
    ex = evals[0]
    dt, dpi = time_gaps(ex)
    # The query takes the latest history date; gaps are in days; order gap 1 = latest record.
    assert dt[-1] == 0.0 and dt[0] == 7.0 * (len(ex.history) - 1)
    assert dpi == [float(len(ex.history) - j) for j in range(len(ex.history))]
    keep = bm25_keep(ex, TASK, 2)
    assert len(keep) == 2 and keep == sorted(keep)


def test_checkpoint_reload_reproduces_predictions(stage1_dir, data, tmp_path):
    train, evals, users = data
    bb = load_backbone_dir(stage1_dir)
    cache = EmbeddingCache(tmp_path / "cache", bb.model, bb.tokenizer)
    res = train_stage2(
        bb.model, bb.tokenizer, TASK, train, users, Stage2Config(epochs=2, lr=1e-3, batch_size=8), cache, progress=False
    )
    enc = encoder_for(res.model, TASK, bb.tokenizer, cache).encode(evals, res.model.user_rows, progress=False)
    preds = generate_texts(res.model, enc, bb.tokenizer, TASK, progress=False)
    res.model.save(tmp_path / "state")
    assert {p.name for p in (tmp_path / "state").iterdir()} == {"prefix.safetensors", "tapper_config.json"}
    reloaded = TapPer.load(tmp_path / "state", load_backbone_dir(stage1_dir).model)
    again = generate_texts(reloaded, enc, bb.tokenizer, TASK, progress=False)
    assert preds == again
    for k, v in res.model.state_tensors().items():
        assert torch.equal(v, reloaded.state_tensors()[k]), k


@pytest.mark.parametrize(
    "switch,check",
    [
        ({"use_bridge": False}, lambda m: not m.bridge_parameters()),
        ({"use_pu": False}, lambda m: m.per_user_params() == 0 and not m.trainable_parameters()["user_table"]),
        ({"use_pq": False}, lambda m: not m.trainable_parameters()["shared"]),
        ({"prefix_len": 4}, lambda m: m.per_user_params() == 4 * m.d),
    ],
)
def test_ablation_switches(stage1_dir, switch, check):
    model = TapPer(load_backbone_dir(stage1_dir).model, ["a", "b"], Stage2Config(**switch))
    assert check(model)


def test_per_user_params_is_L_times_d(stage1_dir):
    model = TapPer(load_backbone_dir(stage1_dir).model, ["a"], Stage2Config(prefix_len=8))
    assert model.per_user_params() == 8 * model.d
    assert model.prefix.user_table.weight.shape == (2, 8 * model.d)  # row 0 = unknown user


def test_prefix_changes_the_prediction_path(stage1_dir, data):
    """Soft tokens really reach the model: a different prefix gives a different loss."""
    train, _, users = data
    bb = load_backbone_dir(stage1_dir)
    plm = PrefixedLM(bb.model)
    items = tokenize_examples(TASK, bb.tokenizer, train[:4], 128)
    batch = lm_train_batch(items, bb.tokenizer.pad_token_id)
    with torch.no_grad():
        a = plm.loss(batch, torch.zeros(4, 8, bb.hidden_size))
        b = plm.loss(batch, torch.randn(4, 8, bb.hidden_size))
    assert not torch.isclose(a, b)


@pytest.mark.parametrize("std", [0.0, 0.1, 1.0])
def test_user_rows_start_at_the_configured_scale(stage1_dir, std):
    """user_init_std sets the spread of the known users' rows; row 0 (unknown user) stays zero."""
    model = TapPer(load_backbone_dir(stage1_dir).model, [f"u{i}" for i in range(50)], Stage2Config(user_init_std=std))
    table = model.prefix.user_table.weight.detach()
    assert torch.count_nonzero(table[0]) == 0
    assert float(table[1:].std()) == pytest.approx(std, abs=0.02 * max(std, 0.1))


def test_user_init_std_must_not_be_negative():
    with pytest.raises(ValueError, match="user_init_std"):
        Stage2Config(user_init_std=-0.1)


def test_din_score_bound_caps_how_much_one_record_can_take(stage1_dir):
    """With content scores bounded to [-b, b] and no temporal terms, one record of n gets at most
    e^{2b} / (e^{2b} + n - 1) of the attention, however large the DIN's raw scores grow."""
    n, b = 10, 1.0
    mask, dt, dpi = torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n), torch.zeros(1, n)
    alphas = {}
    for bound in (None, b):
        torch.manual_seed(0)
        model = TapPer(load_backbone_dir(stage1_dir).model, ["a"], Stage2Config(din_score_bound=bound))
        zq, zh = torch.randn(1, model.d), torch.randn(1, n, model.d)
        with torch.no_grad():
            model.prefix.din[-1].weight.normal_(std=1e3)  # raw scores far apart (the layer starts at zero)
        alphas[bound] = model.prefix.attention(zq, zh, mask, dt, dpi)[0]
    cap = math.exp(2 * b) / (math.exp(2 * b) + n - 1)
    assert float(alphas[None].max()) > 0.99
    assert float(alphas[b].max()) <= cap + 1e-6 and torch.allclose(alphas[b].sum(), torch.tensor(1.0))


def test_din_score_bound_must_be_positive():
    with pytest.raises(ValueError, match="din_score_bound"):
        Stage2Config(din_score_bound=0)
