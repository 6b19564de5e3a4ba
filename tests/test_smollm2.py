"""The bundled SmolLM2 backbone end to end: GGUF -> HF dir, Stage-1 LoRA + merge + save, prefixed generation.

Slow (the conversion and a 135M model on CPU): `make test-slow`.
"""

from __future__ import annotations

import pytest

from model_fixtures import TASK, tiny_examples
from tapper.config import Stage1Config, Stage2Config
from tapper.eval.predict import generate_texts
from tapper.model.backbone import load_backbone, load_backbone_dir
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.tapper import TapPer
from tapper.train.stage1 import train_stage1
from tapper.train.stage2 import encoder_for

pytestmark = pytest.mark.slow


def test_smollm2_stage1_merge_save_and_prefixed_generation(tmp_path):
    train, evals, users = tiny_examples(n_users=2, n_hist=2)
    bb = load_backbone("smollm2")
    assert bb.hidden_size == 576 and bb.model.config.num_hidden_layers == 30
    # The converted directory must not carry the GGUF quantization_config: saving the merged
    # Stage-1 model would refuse to serialize.
    assert getattr(load_backbone_dir(bb.path).model.config, "quantization_config", None) is None
    res = train_stage1(
        bb, TASK, train, Stage1Config(epochs=1, batch_size=2, max_len=96), tmp_path / "s1", progress=False
    )
    merged = load_backbone_dir(res.path)
    model = TapPer(merged.model, users, Stage2Config(max_len=96))
    assert model.per_user_params() == 8 * 576
    cache = EmbeddingCache(tmp_path / "cache", merged.model, merged.tokenizer)
    enc = encoder_for(model, TASK, merged.tokenizer, cache).encode(evals, model.user_rows, progress=False)
    preds = generate_texts(model, enc, merged.tokenizer, TASK, max_new_tokens=4, progress=False)
    assert set(preds) == {e.id for e in evals} and all(isinstance(p, str) for p in preds.values())
