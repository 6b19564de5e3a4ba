"""TAP-PER and its ablations: switches of one Stage-2 model, so a variant name maps to Stage-2 config overrides.

tap-per        the full model, with the run's Stage-2 settings
tap-per-paper  the full model as the paper describes it: the departures we made (standardized P_q
               inputs, a bridge on the prefix positions only, bounded DIN scores, history dropout,
               the auxiliary answer readout, epoch selection on held-out examples) switched off
no-bridge      -bridge          no-pq    -P_q          no-pu / pq-only   -P_u
lambda-t0      λ_t = 0          lambda-o0  λ_o = 0     lambda0   both 0
bm25-kN        BM25 pre-filter keeping N records before the attention
L-N            prefix length N
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

from tapper.config import RunConfig, Stage2Config, from_dict
from tapper.data.prepared import PreparedData
from tapper.eval.predict import generate_texts
from tapper.methods.registry import Method
from tapper.methods.result import VariantResult, score
from tapper.model.backbone import Backbone, load_backbone_dir
from tapper.model.shared_cache import cache_for
from tapper.train.stage2 import encoder_for, train_stage2

# The paper's configuration: every departure of Stage2Config from it reset (see tapper.config.Stage2Config).
PAPER = {
    "input_norm": "unit_rms",
    "bridge_scope": "all",
    "din_score_bound": None,
    "history_dropout": 0.0,
    "aux_weight": 0.0,
    "validation_share": 0.0,
}

SWITCHES: dict[str, tuple[dict, str]] = {
    "tap-per": ({}, "the full model with the run's Stage-2 settings"),
    "tap-per-paper": (PAPER, "the full model exactly as the paper describes it (our departures off)"),
    "no-bridge": ({"use_bridge": False}, "without the bridge LoRA"),
    "no-pq": ({"use_pq": False}, "without the query-conditioned prefix P_q"),
    "no-pu": ({"use_pu": False}, "without the per-user prefix P_u"),
    # P_q-only: no per-user parameters; serves users never seen in training.
    "pq-only": ({"use_pu": False}, "P_q alone: no per-user parameters (serves unseen users)"),
    "lambda-t0": ({"use_lambda_t": False}, "time decay λ_t = 0"),
    "lambda-o0": ({"use_lambda_o": False}, "order decay λ_o = 0"),
    "lambda0": ({"use_lambda_t": False, "use_lambda_o": False}, "λ_t = λ_o = 0"),
}
BM25 = r"bm25-k(\d+)"
PREFIX_LEN = r"L-?(\d+)"


def stage2_overrides(name: str) -> dict | None:
    """Stage-2 config overrides for a TAP-PER variant name, or None if it is not one."""
    if name in SWITCHES:
        return dict(SWITCHES[name][0])
    m = re.fullmatch(BM25, name)
    if m:
        return {"bm25_k": int(m.group(1))}
    m = re.fullmatch(PREFIX_LEN, name)
    if m:
        return {"prefix_len": int(m.group(1))}
    return None


def stage2_config_for(variant: str, cfg: RunConfig) -> Stage2Config:
    overrides = stage2_overrides(variant)
    if overrides is None:
        raise ValueError(f"{variant!r} is not a TAP-PER variant")
    return from_dict(Stage2Config, {**dataclasses.asdict(cfg.stage2), **overrides}, f"variant {variant}")


def train_tapper_variant(variant: str, stage1_dir: Path, data: PreparedData, cfg: RunConfig, progress=True, log=None):
    """Stage 2 of one TAP-PER variant on a fresh copy of the merged backbone: (backbone, Stage2Result)."""
    s2cfg = stage2_config_for(variant, cfg)
    bb = load_backbone_dir(stage1_dir, dtype=s2cfg.dtype)
    result = train_stage2(
        bb.model,
        bb.tokenizer,
        data.task,
        data.splits.stage2_train,
        data.splits.stage2_users,
        s2cfg,
        cache_for(bb),
        seed=cfg.seed,
        backbone_hash=bb.weights_hash,
        progress=progress,
        on_epoch=(lambda e, loss: log(variant, e, loss)) if log else None,
    )
    return bb, result


def predict_eval(model, bb: Backbone, data: PreparedData, cfg: RunConfig, name: str, progress=True) -> dict[str, str]:
    """A TAP-PER model's predictions on the evaluation split (unknown users get P_q only)."""
    rows = model.user_rows if model.cfg.use_pu else None
    encoded = encoder_for(model, data.task, bb.tokenizer, cache_for(bb)).encode(
        data.splits.eval, rows, progress=progress
    )
    return generate_texts(
        model, encoded, bb.tokenizer, data.task, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress, name
    )


def evaluate_saved(
    state_dir: Path, stage1_dir: Path, data: PreparedData, cfg: RunConfig, name: str, progress=True
) -> tuple[dict[str, str], dict[str, float]]:
    """(predictions, metrics) of a saved TAP-PER state on the merged backbone: what a pipeline's evaluation step
    and the promotion's re-evaluation of production do with a state another step trained."""
    from tapper.model.tapper import TapPer

    bb = load_backbone_dir(stage1_dir)
    model = TapPer.load(state_dir, bb.model)
    preds = predict_eval(model, bb, data, cfg, name, progress)
    return preds, score(data, preds)


def run(
    variant: str, stage1_dir: Path, data: PreparedData, cfg: RunConfig, out_dir: Path | None, progress=True, log=None
) -> VariantResult:
    """The registry's runner: train_and_evaluate with the state kept in out_dir/tapper/<variant>."""
    state_dir = Path(out_dir) / "tapper" / variant if out_dir is not None else None
    return train_and_evaluate(variant, stage1_dir, data, cfg, state_dir, progress, log)


def train_and_evaluate(
    variant: str,
    stage1_dir: Path,
    data: PreparedData,
    cfg: RunConfig,
    state_dir: Path | None = None,
    progress=True,
    log=None,
) -> VariantResult:
    """Train one Stage-2 variant on a fresh copy of the merged backbone and evaluate it; its state saved to
    `state_dir` when given."""
    t0 = time.time()
    bb, result = train_tapper_variant(variant, stage1_dir, data, cfg, progress, log)
    model = result.model
    preds = predict_eval(model, bb, data, cfg, variant, progress)
    if state_dir is not None:
        model.save(state_dir)
    return VariantResult(
        variant,
        preds,
        score(data, preds),
        per_user_params=model.per_user_params(),
        shared_params=model.shared_params(),
        losses=result.losses,
        seconds=time.time() - t0,
        extra={
            "lambda_t": float(model.prefix.lambda_t.detach()),
            "lambda_o": float(model.prefix.lambda_o.detach()),
            "n_train": result.n_examples,
            **({"validation": result.validation, "best_epoch": result.best_epoch} if result.validation else {}),
        },
    )


METHODS = (
    *(Method(name, "tap-per", summary, run) for name, (_, summary) in SWITCHES.items()),
    Method("bm25-kN", "tap-per", "BM25 pre-filter keeping N records before the attention", run, pattern=BM25),
    Method("L-N", "tap-per", "prefix length N", run, pattern=PREFIX_LEN),
)
