"""One experiment on LaMP files: split, Stage 1, Stage 2 variants, evaluation, report files.

The functions here are the building blocks both `tapper experiment` and the
ZenML steps call, so a pipeline run and a direct run compute the same thing.

Output contract (DIR):
    metrics.json                {"task", "files", "variants": {name: {metric: value}}, "per_user_params",
                                 "shared_params", "params": {name: {...}}, "groups": {...}?, "pending": [...]}
                                rewritten after each variant; "pending" names those not done yet
    predictions/<variant>.json  LaMP's format {"task", "golds": [{"id", "output"}]}
    stage1/                     the merged Stage-1 backbone (HF directory)
    tapper/<variant>/           each Stage-2 model's state (safetensors + JSON)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tapper.atomic import atomic_write_json
from tapper.config import RunConfig, Stage2Config, from_dict
from tapper.data import get_task, load_lamp, make_splits, validate_dataset, write_predictions
from tapper.data.splits import Splits
from tapper.data.types import Example
from tapper.eval.metrics import compute_metrics, per_query_scores
from tapper.eval.paired import paired_difference
from tapper.eval.predict import generate_texts
from tapper.model.backbone import Backbone, load_backbone, load_backbone_dir
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.shared_cache import one_cache_per_run, shared_embedding_cache
from tapper.model.prefixed_lm import PrefixedLM
from tapper.paths import cache_dir
from tapper.train.stage1 import Stage1Result, train_stage1
from tapper.train.stage2 import encoder_for, train_stage2
from tapper.variants import check_variants, extra_variant, stage2_overrides

LossLogger = Callable[[str, int, float], None]  # (stage/variant, epoch, loss)


@dataclass
class PreparedData:
    task: object  # TaskSpec adapted to the dataset's own query wording
    splits: Splits
    n_users: int
    n_records: int


def prepare_data(task_name: str | None, questions: str | Path, outputs: str | Path, stage2_users: int) -> PreparedData:
    ds = load_lamp(questions, outputs, task_name)
    spec = get_task(ds.task).adapted_to(q.input for q in ds.queries)
    validate_dataset(ds, spec, source=str(questions))
    splits = make_splits(ds, spec, stage2_users)
    n_records = sum(len(q.profile) for q in ds.queries)
    return PreparedData(task=spec, splits=splits, n_users=len(ds.users()), n_records=n_records)


def tokenizer_corpus(data: PreparedData) -> list[str]:
    """Texts the tiny backbone's tokenizer is trained on: every prompt, answer and record."""
    task, s = data.task, data.splits
    texts = []
    for ex in s.stage1_train + s.stage2_train + s.eval:
        texts.append(task.prompt(ex.input))
    # Answers the models train on, never the evaluation golds (the label names come with the task below).
    for ex in s.stage1_train + s.stage2_train:
        if ex.target is not None:
            texts.append(task.format_target(ex.target))
    for ex in s.eval:
        texts.extend(task.record_text(r) for r in ex.history)
    if task.labels:
        texts.extend(task.labels)
    return texts


def open_backbone(spec: str, data: PreparedData, seed: int = 0, dtype: str = "fp32") -> Backbone:
    return load_backbone(spec, texts=tokenizer_corpus(data) if spec == "tiny" else None, seed=seed, dtype=dtype)


def run_stage1(backbone: Backbone, data: PreparedData, cfg: RunConfig, out_dir: Path, progress=True, log: LossLogger | None = None) -> Stage1Result:
    on_epoch = (lambda e, l: log("stage1", e, l)) if log else None
    return train_stage1(backbone, data.task, data.splits.stage1_train, cfg.stage1, out_dir, seed=cfg.seed, progress=progress, on_epoch=on_epoch)


def embedding_cache(backbone: Backbone, root: Path | None = None) -> EmbeddingCache:
    """The run's cache for `backbone` (one per backbone directory within run_experiment: tapper.model.shared_cache)."""
    return shared_embedding_cache(root or cache_dir() / "embeddings", backbone)


@dataclass
class VariantResult:
    name: str
    predictions: dict[str, str]
    metrics: dict[str, float]
    per_user_params: int = 0
    shared_params: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def evaluate_base(stage1_dir: Path, data: PreparedData, cfg: RunConfig, progress=True) -> VariantResult:
    t0 = time.time()
    bb = load_backbone_dir(stage1_dir, dtype=cfg.eval.dtype)
    enc = encoder_for_base(bb, data, cfg)
    encoded = enc.encode(data.splits.eval, progress=progress)
    preds = generate_texts(PrefixedLM(bb.model), encoded, bb.tokenizer, data.task, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress, "base")
    return VariantResult("base", preds, score(data, preds), seconds=time.time() - t0)


def encoder_for_base(bb: Backbone, data: PreparedData, cfg: RunConfig):
    from tapper.train.features import FeatureEncoder

    return FeatureEncoder(data.task, bb.tokenizer, embedding_cache(bb), max_len=cfg.stage1.max_len)


def _golds(data: PreparedData, examples: list[Example] | None) -> dict[str, str]:
    return {ex.id: ex.target for ex in (examples if examples is not None else data.splits.eval)}


def score(data: PreparedData, preds: dict[str, str], examples: list[Example] | None = None) -> dict[str, float]:
    golds = _golds(data, examples)
    return compute_metrics(data.task, {k: preds[k] for k in golds}, golds)


def query_scores(data: PreparedData, preds: dict[str, str], examples: list[Example] | None = None) -> dict[str, float]:
    """Each query's share of the primary metric (tapper.eval.metrics.per_query_scores), for paired comparisons."""
    golds = _golds(data, examples)
    return per_query_scores(data.task, {k: preds[k] for k in golds}, golds)


def stage2_config_for(variant: str, cfg: RunConfig) -> Stage2Config:
    overrides = stage2_overrides(variant)
    if overrides is None:
        raise ValueError(f"{variant!r} is not a TAP-PER variant")
    return from_dict(Stage2Config, {**_asdict(cfg.stage2), **overrides}, f"variant {variant}")


def _asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def train_tapper_variant(variant: str, stage1_dir: Path, data: PreparedData, cfg: RunConfig, progress=True,
                         log: LossLogger | None = None):
    """Stage 2 of one TAP-PER variant on a fresh copy of the merged backbone: (backbone, Stage2Result)."""
    s2cfg = stage2_config_for(variant, cfg)
    bb = load_backbone_dir(stage1_dir, dtype=s2cfg.dtype)
    result = train_stage2(
        bb.model, bb.tokenizer, data.task, data.splits.stage2_train, data.splits.stage2_users, s2cfg, embedding_cache(bb),
        seed=cfg.seed, backbone_hash=bb.weights_hash, progress=progress,
        on_epoch=(lambda e, l: log(variant, e, l)) if log else None,
    )
    return bb, result


def predict_eval(model, bb: Backbone, data: PreparedData, cfg: RunConfig, name: str, progress=True) -> dict[str, str]:
    """A TAP-PER model's predictions on the evaluation split (unknown users get P_q only)."""
    rows = model.user_rows if model.cfg.use_pu else None
    encoded = encoder_for(model, data.task, bb.tokenizer, embedding_cache(bb)).encode(data.splits.eval, rows, progress=progress)
    return generate_texts(model, encoded, bb.tokenizer, data.task, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress, name)


def run_tapper_variant(variant: str, stage1_dir: Path, data: PreparedData, cfg: RunConfig, state_dir: Path | None = None,
                       progress=True, log: LossLogger | None = None) -> VariantResult:
    """Train one Stage-2 variant on a fresh copy of the merged backbone and evaluate it."""
    t0 = time.time()
    bb, result = train_tapper_variant(variant, stage1_dir, data, cfg, progress, log)
    model = result.model
    preds = predict_eval(model, bb, data, cfg, variant, progress)
    if state_dir is not None:
        model.save(state_dir)
    return VariantResult(
        variant, preds, score(data, preds), per_user_params=model.per_user_params(), shared_params=model.shared_params(),
        losses=result.losses, seconds=time.time() - t0,
        extra={"lambda_t": float(model.prefix.lambda_t.detach()), "lambda_o": float(model.prefix.lambda_o.detach()), "n_train": result.n_examples,
               **({"validation": result.validation, "best_epoch": result.best_epoch} if result.validation else {})},
    )


def run_variant(variant: str, stage1_dir: Path, data: PreparedData, cfg: RunConfig, out_dir: Path, progress=True, log=None) -> VariantResult:
    if variant == "base":
        return evaluate_base(stage1_dir, data, cfg, progress)
    if stage2_overrides(variant) is not None:
        return run_tapper_variant(variant, stage1_dir, data, cfg, out_dir / "tapper" / variant, progress, log)
    fn = extra_variant(variant)
    return fn(variant=variant, stage1_dir=stage1_dir, data=data, cfg=cfg, out_dir=out_dir, progress=progress, log=log)


def group_metrics(data: PreparedData, preds: dict[str, str], groups: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    out = {}
    for gname, users in groups.items():
        members = set(users)
        exs = [ex for ex in data.splits.eval if ex.user_id in members]
        if exs:
            out[gname] = {**score(data, preds, exs), "n": len(exs)}
    return out


def paired_comparisons(data: PreparedData, predictions: dict[str, dict[str, str]],
                       groups: dict[str, list[str]] | None = None) -> dict:
    """Every variant against the base, and full TAP-PER against every other variant, on the same queries: the
    per-query difference of the task's primary metric, its mean and a 95 % paired-bootstrap interval
    (tapper.eval.paired), over all evaluation queries and within each user group."""
    scores = {v: query_scores(data, preds) for v, preds in predictions.items()}
    pairs = [(v, "base") for v in scores if v != "base" and "base" in scores]
    pairs += [("tap-per", v) for v in scores if v not in ("tap-per", "base") and "tap-per" in scores]
    user_sets = {g: set(users) for g, users in (groups or {}).items()}
    members = {g: [ex.id for ex in data.splits.eval if ex.user_id in users] for g, users in user_sets.items()}
    out = {}
    for a, b in pairs:
        entry = {"all": paired_difference(scores[a], scores[b])}
        for g, ids in members.items():
            if ids:
                entry[g] = paired_difference({i: scores[a][i] for i in ids}, {i: scores[b][i] for i in ids})
        out[f"{a} - {b}"] = entry
    return {"metric": data.task.primary_metric, "higher_is_better": data.task.higher_is_better, "pairs": out}


def run_experiment(
    task_name: str | None,
    questions: str | Path,
    outputs: str | Path,
    backbone: str,
    out_dir: str | Path,
    cfg: RunConfig,
    variants: list[str],
    user_groups: dict[str, list[str]] | None = None,
    progress: bool = True,
    log: LossLogger | None = None,
) -> dict:
    check_variants(variants)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_data(task_name, questions, outputs, cfg.stage2_users)
    bb = open_backbone(backbone, data, cfg.seed, cfg.stage1.dtype)
    s1 = run_stage1(bb, data, cfg, out_dir / "stage1", progress, log)
    results: dict[str, VariantResult] = {}

    def report_so_far() -> dict:
        main = results.get("tap-per") or next((r for r in results.values() if r.per_user_params), None)
        report = {
            "task": data.task.name,
            "backbone": backbone,
            # Which files this run scored, so a report over several runs can tell them apart.
            "files": {"questions": str(questions), "outputs": str(outputs)},
            "variants": {k: r.metrics for k, r in results.items()},
            "per_user_params": main.per_user_params if main else 0,
            "shared_params": main.shared_params if main else 0,
            "params": {k: {"per_user": r.per_user_params, "shared": r.shared_params} for k, r in results.items()},
            "details": {k: {"seconds": round(r.seconds, 2), "losses": r.losses, **r.extra} for k, r in results.items()},
            "data": {
                "users": data.n_users, "stage1_users": len(data.splits.stage1_users), "stage2_users": len(data.splits.stage2_users),
                "stage1_examples": s1.n_examples, "stage2_examples": len(data.splits.stage2_train), "eval_queries": len(data.splits.eval),
            },
            "stage1": {"losses": s1.losses, "weights_hash": s1.weights_hash},
            "config": cfg.to_dict(),
            "seconds": round(time.time() - t0, 2),
            "pending": [v for v in variants if v not in results],
        }
        if user_groups:
            report["groups"] = {k: group_metrics(data, r.predictions, user_groups) for k, r in results.items()}
        report["paired"] = paired_comparisons(data, {k: r.predictions for k, r in results.items()}, user_groups)
        return report

    caches: dict = {}  # one embedding cache for every variant (tapper.model.shared_cache)
    for v in variants:
        with one_cache_per_run(caches):
            res = run_variant(v, s1.path, data, cfg, out_dir, progress, log)
        results[v] = res
        write_predictions(data.task.name, res.predictions, out_dir / "predictions" / f"{v}.json")
        # Rewritten after every variant but the last (written, complete, below): a run stopped
        # hours in keeps the metrics of what it finished ("pending" lists the rest).
        if len(results) < len(variants):
            atomic_write_json(out_dir / "metrics.json", report_so_far())
    report = report_so_far()
    atomic_write_json(out_dir / "metrics.json", report)
    return report


def load_user_groups(path: str | Path) -> dict[str, list[str]]:
    """Groups of user ids from a JSON file: {"groups": {name: [ids]}} or a synthetic users.json."""
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, dict) and "groups" in obj:
        return {k: list(v) for k, v in obj["groups"].items()}
    users = obj["users"] if isinstance(obj, dict) and "users" in obj else obj
    groups: dict[str, list[str]] = {"drifting": [], "stable": []}
    items = users.items() if isinstance(users, dict) else ((u.get("user_id"), u) for u in users)
    for uid, info in items:
        groups["drifting" if info.get("drifts") else "stable"].append(str(uid))
    return groups
