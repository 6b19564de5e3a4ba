"""`base`: the Stage-1 merged backbone alone, no prefix and no history; every method's floor."""

from __future__ import annotations

import time
from pathlib import Path

from tapper.config import RunConfig
from tapper.data.prepared import PreparedData
from tapper.eval.predict import generate_texts
from tapper.methods.registry import Method
from tapper.methods.result import VariantResult, score
from tapper.model.backbone import Backbone, load_backbone_dir
from tapper.model.shared_cache import cache_for
from tapper.model.prefixed_lm import PrefixedLM
from tapper.train.features import FeatureEncoder


def encoder_for_base(bb: Backbone, data: PreparedData, cfg: RunConfig) -> FeatureEncoder:
    return FeatureEncoder(data.task, bb.tokenizer, cache_for(bb), max_len=cfg.stage1.max_len)


def run(
    variant: str,
    stage1_dir: Path,
    data: PreparedData,
    cfg: RunConfig,
    out_dir: Path | None = None,
    progress=True,
    log=None,
) -> VariantResult:
    t0 = time.time()
    bb = load_backbone_dir(stage1_dir, dtype=cfg.eval.dtype)
    encoded = encoder_for_base(bb, data, cfg).encode(data.splits.eval, progress=progress)
    preds = generate_texts(
        PrefixedLM(bb.model),
        encoded,
        bb.tokenizer,
        data.task,
        cfg.eval.batch_size,
        cfg.eval.max_new_tokens,
        progress,
        "base",
    )
    return VariantResult("base", preds, score(data, preds), seconds=time.time() - t0)


METHODS = (Method("base", "base", "the Stage-1 merged backbone without any prefix", run),)
