"""One experiment on LaMP files: split, Stage 1, Stage 2 variants, evaluation, report files.

The functions here are the building blocks both `tapper experiment` and the
ZenML steps call, so a pipeline run and a direct run compute the same thing.

Output contract (DIR):
    metrics.json                tapper.eval.metrics_file.ExperimentMetrics: {"task", "variants": {name: {metric:
                                value}}, "params", "details", "data", "paired", "pending", ...}, rewritten after
                                each variant; "pending" names those not done yet
    predictions/<variant>.json  LaMP's format {"task", "golds": [{"id", "output"}]}
    stage1/                     the merged Stage-1 backbone (HF directory)
    tapper/<variant>/           each Stage-2 model's state (safetensors + JSON)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from tapper import methods
from tapper.atomic import atomic_write_json
from tapper.config import RunConfig
from tapper.data import write_predictions
from tapper.data.prepared import PreparedData, prepare_data, tokenizer_corpus
from tapper.eval.metrics_file import experiment_metrics
from tapper.eval.paired import paired_difference
from tapper.methods.base import encoder_for_base, run as _run_base
from tapper.methods.result import VariantResult, query_scores, score
from tapper.methods.tap_per import predict_eval, stage2_config_for, train_tapper_variant
from tapper.model.backbone import Backbone, load_backbone

# embedding_cache: the run's shared cache (tapper.model.shared_cache), under the name the steps and analyses use.
from tapper.model.shared_cache import cache_for as embedding_cache
from tapper.model.shared_cache import one_cache_per_run
from tapper.train.stage1 import Stage1Result, train_stage1

# Re-exported for callers of the orchestration API (steps, benchmarks): the pieces live with their method.
__all__ = [
    "PreparedData",
    "prepare_data",
    "tokenizer_corpus",
    "open_backbone",
    "run_stage1",
    "embedding_cache",
    "VariantResult",
    "score",
    "query_scores",
    "evaluate_base",
    "encoder_for_base",
    "stage2_config_for",
    "train_tapper_variant",
    "predict_eval",
    "run_variant",
    "group_metrics",
    "paired_comparisons",
    "run_experiment",
    "load_user_groups",
]

LossLogger = Callable[[str, int, float], None]  # (stage/variant, epoch, loss)


def open_backbone(spec: str, data: PreparedData, seed: int = 0, dtype: str = "fp32") -> Backbone:
    return load_backbone(spec, texts=tokenizer_corpus(data) if spec == "tiny" else None, seed=seed, dtype=dtype)


def run_stage1(
    backbone: Backbone, data: PreparedData, cfg: RunConfig, out_dir: Path, progress=True, log: LossLogger | None = None
) -> Stage1Result:
    on_epoch = (lambda e, loss: log("stage1", e, loss)) if log else None
    return train_stage1(
        backbone,
        data.task,
        data.splits.stage1_train,
        cfg.stage1,
        out_dir,
        seed=cfg.seed,
        progress=progress,
        on_epoch=on_epoch,
    )


def evaluate_base(stage1_dir: Path, data: PreparedData, cfg: RunConfig, progress=True) -> VariantResult:
    return _run_base("base", stage1_dir, data, cfg, None, progress)


def run_variant(
    variant: str, stage1_dir: Path, data: PreparedData, cfg: RunConfig, out_dir: Path, progress=True, log=None
) -> VariantResult:
    """Any registered method (tapper.methods) on the run's merged backbone and split."""
    return methods.get(variant).run(variant, stage1_dir, data, cfg, out_dir, progress, log)


def group_metrics(
    data: PreparedData, preds: dict[str, str], groups: dict[str, list[str]]
) -> dict[str, dict[str, float]]:
    out = {}
    for gname, users in groups.items():
        members = set(users)
        exs = [ex for ex in data.splits.eval if ex.user_id in members]
        if exs:
            out[gname] = {**score(data, preds, exs), "n": len(exs)}
    return out


def paired_comparisons(
    data: PreparedData, predictions: dict[str, dict[str, str]], groups: dict[str, list[str]] | None = None
) -> dict:
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
    methods.check_variants(variants)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_data(task_name, questions, outputs, cfg.stage2_users)
    bb = open_backbone(backbone, data, cfg.seed, cfg.stage1.dtype)
    s1 = run_stage1(bb, data, cfg, out_dir / "stage1", progress, log)
    results: dict[str, VariantResult] = {}

    def report_so_far() -> dict:
        return experiment_metrics(
            task=data.task.name,
            backbone=backbone,
            results=results,
            data=data,
            stage1_losses=s1.losses,
            stage1_examples=s1.n_examples,
            weights_hash=s1.weights_hash,
            config=cfg.to_dict(),
            seconds=time.time() - t0,
            # Which files this run scored, so a report over several runs can tell them apart.
            files={"questions": str(questions), "outputs": str(outputs)},
            pending=[v for v in variants if v not in results],
            groups={k: group_metrics(data, r.predictions, user_groups) for k, r in results.items()}
            if user_groups
            else None,
            paired=paired_comparisons(data, {k: r.predictions for k, r in results.items()}, user_groups),
        ).to_dict()

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
