"""Evaluation steps: the Stage-1 base, TAP-PER, any configured variant; the side-by-side report."""

from __future__ import annotations

from typing import Annotated, List, Optional

from zenml import log_metadata, step
from zenml.logger import get_logger

from materializers.types import BackboneDir, ComparisonReport, EmbeddingTable, EvalReport, TapPerState, VariantResult
from steps._core import (
    active_mlflow,
    eval_data_hash,
    evaluate_state,
    install_embeddings,
    quiet,
    run_config,
    step_tempdir,
    variant_eval,
)
from tapper.experiment import PreparedData, query_scores

logger = get_logger(__name__)


def _log(ev: VariantResult) -> None:
    logger.info("%s: %s (%.0f s)", ev.name, ", ".join(f"{k}={v:.4f}" for k, v in ev.metrics.items()), ev.seconds)
    log_metadata(metadata={"metrics": {k: float(v) for k, v in ev.metrics.items()}})
    mlflow = active_mlflow()
    if mlflow is not None:  # in the run's MLflow run as soon as it is known (register_model adds cached ones)
        mlflow.log_metrics({f"{ev.name}/{k}": float(v) for k, v in ev.metrics.items()})


@step
def evaluate_base(
    stage1_backbone: BackboneDir,
    data: PreparedData,
    embeddings: EmbeddingTable,
    stage1: Optional[dict] = None,
    eval: Optional[dict] = None,
    seed: int = 0,  # noqa: A002 - the config section's name
) -> Annotated[VariantResult, "eval_base"]:
    """The merged Stage-1 backbone without any prefix: the non-personalized reference."""
    from tapper.experiment import evaluate_base as core_evaluate_base

    quiet()
    install_embeddings(embeddings)
    res = core_evaluate_base(
        stage1_backbone.path, data, run_config(data, seed, stage1=stage1, eval=eval), progress=True
    )
    ev = variant_eval(res, data.task.name)
    _log(ev)
    return ev


@step
def evaluate_tapper(
    stage1_backbone: BackboneDir,
    tapper_state: TapPerState,
    data: PreparedData,
    embeddings: EmbeddingTable,
    eval: Optional[dict] = None,
    seed: int = 0,  # noqa: A002
) -> Annotated[VariantResult, "eval_tapper"]:
    """The trained TAP-PER state, loaded from its artifact, on the Stage-2 users' queries."""
    quiet()
    install_embeddings(embeddings)
    ev = evaluate_state(tapper_state, stage1_backbone.path, data, run_config(data, seed, eval=eval))
    _log(ev)
    return ev


@step
def evaluate_variant(
    variant: str,
    stage1_backbone: BackboneDir,
    data: PreparedData,
    embeddings: EmbeddingTable,
    run: Optional[dict] = None,
) -> Annotated[VariantResult, "eval_variant"]:
    """Any other method `tapper experiment --variants` knows (ablation switches, baselines): trained and evaluated."""
    from tapper.experiment import run_variant
    from tapper.model.shared_cache import one_cache_per_run

    quiet()
    install_embeddings(embeddings)
    r = dict(run or {})
    r.pop("stage2_users", None)
    cfg = run_config(data, r.pop("seed", 0), **r)
    with one_cache_per_run():  # training and evaluation read one cache (hashed and loaded once)
        res = run_variant(variant, stage1_backbone.path, data, cfg, step_tempdir("tapper-variant-"), progress=True)
    ev = variant_eval(res, data.task.name)
    _log(ev)
    return ev


@step
def report(
    evals: List[VariantResult], stage1_backbone: BackboneDir, data: PreparedData, candidate: str = "tap-per"
) -> Annotated[EvalReport, "evaluation_report"]:
    """All variants side by side (HTML table + loss plot in the dashboard), with what promotion compares."""
    task = data.task
    by_name = {e.name: e for e in evals}
    if candidate not in by_name:
        raise ValueError(f"candidate {candidate!r} was not evaluated; evaluated: {sorted(by_name)}")
    losses = {"stage1": list(stage1_backbone.losses)}
    losses.update({e.name: list(e.losses) for e in evals if e.losses})
    from tapper.eval.paired import describe
    from tapper.experiment import paired_comparisons

    rep = EvalReport(
        task=task.name,
        primary_metric=task.primary_metric,
        higher_is_better=task.higher_is_better,
        candidate=candidate,
        eval_data_hash=eval_data_hash(data),
        eval_queries=len(data.splits.eval),
        variants={e.name: {k: float(v) for k, v in e.metrics.items()} for e in evals},
        params={e.name: {"per_user": e.per_user_params, "shared": e.shared_params} for e in evals},
        losses=losses,
        candidate_per_query=query_scores(data, by_name[candidate].predictions),
        paired=paired_comparisons(data, {e.name: e.predictions for e in evals}) if len(evals) > 1 else {},
        references=reference_scores(data),
    )
    logger.info(
        "%s on %d queries: %s %s = %.4f",
        task.name,
        rep.eval_queries,
        candidate,
        rep.primary_metric,
        rep.candidate_score,
    )
    for pair, by_group in (rep.paired.get("pairs") or {}).items():
        logger.info("paired %s: %s", pair, describe(by_group["all"]))
    mlflow = active_mlflow()
    if mlflow is not None:
        mlflow.log_metrics({f"reference/{k}": float(v["score"]) for k, v in rep.references.items()})
        for pair, by_group in (rep.paired.get("pairs") or {}).items():
            st, key = by_group["all"], pair.replace(" ", "")
            mlflow.log_metrics(
                {
                    f"paired/{key}/mean": st["mean"],
                    f"paired/{key}/ci95_low": st["ci95"][0],
                    f"paired/{key}/ci95_high": st["ci95"][1],
                }
            )
    return rep


def reference_scores(data: PreparedData) -> dict:
    """What the labels alone score on the evaluation queries (classification tasks): always answering the most
    common gold label (the best constant answer, known only in hindsight), and answering each user's most
    frequent label in their own history (what a model that reads the history perfectly and ignores the text
    would score). A base model below the first has not learnt the task; the gap between the two is what
    personalization can win."""
    from collections import Counter

    task = data.task
    exs = [ex for ex in data.splits.eval if ex.target is not None]
    if task.kind != "classification" or not exs or task.target_field is None:
        return {}
    label, hits = Counter(ex.target for ex in exs).most_common(1)[0]
    user_hits = 0
    for ex in exs:
        past = Counter(r.fields.get(task.target_field) for r in ex.history if r.fields.get(task.target_field))
        user_hits += bool(past) and past.most_common(1)[0][0] == ex.target
    return {
        "most_popular_label": {"score": hits / len(exs), "what": f"always {label!r}"},
        "user_majority_label": {"score": user_hits / len(exs), "what": "each user's most frequent past label"},
    }


def comparison_metrics(
    evals: List[VariantResult], stage1_backbone: BackboneDir, data: PreparedData, backbone: str, run: Optional[dict]
) -> dict:
    """The evaluated variants as a metrics.json (tapper.eval.metrics_file: what write_report reads)."""
    from tapper.eval.metrics_file import experiment_metrics

    return experiment_metrics(
        task=data.task.name,
        backbone=backbone,
        results={e.name: e for e in evals},
        data=data,
        stage1_losses=stage1_backbone.losses,
        stage1_examples=stage1_backbone.n_examples,
        weights_hash=stage1_backbone.weights_hash,
        config=dict(run or {}),
        seconds=sum(e.seconds for e in evals),
    ).to_dict()


@step
def comparison_report(
    evals: List[VariantResult],
    stage1_backbone: BackboneDir,
    data: PreparedData,
    backbone: str = "",
    run: Optional[dict] = None,
) -> Annotated[ComparisonReport, "comparison_report"]:
    """The paper-style comparison report (tapper.analysis.report.write_report: comparison / ablation /
    sensitivity tables, best per metric in bold, PNG plots) of every variant this run evaluated;
    logged to MLflow under comparison/ when the stack has an MLflow tracker."""
    import json
    import tempfile
    from pathlib import Path

    from tapper.analysis.report import write_report

    metrics = comparison_metrics(evals, stage1_backbone, data, backbone, run)
    with tempfile.TemporaryDirectory(prefix="tapper-report-") as tmp:
        files = write_report(metrics, tmp, title=f"TAP-PER: comparison report ({data.task.name}, {backbone} backbone)")
        md, images = files[0].read_text(), {p.name: p.read_bytes() for p in files[1:]}
        mlflow = active_mlflow()
        if mlflow is not None:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics, indent=1))
            for p in [*files, Path(tmp, "metrics.json")]:
                mlflow.log_artifact(str(p), "comparison")
    logger.info("comparison report: %d variants, %d plots", len(metrics["variants"]), len(images))
    return ComparisonReport(task=data.task.name, markdown=md, images=images, metrics=metrics)
