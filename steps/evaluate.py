"""Evaluation steps: the Stage-1 base, TAP-PER, any configured variant; the side-by-side report."""
from __future__ import annotations

from typing import Annotated, List, Optional

from zenml import log_metadata, step
from zenml.logger import get_logger

from materializers.types import BackboneDir, EmbeddingTable, EvalReport, TapPerState, VariantEval
from steps._core import eval_data_hash, evaluate_state, install_embeddings, quiet, run_config, step_tempdir, variant_eval
from tapper.experiment import PreparedData

logger = get_logger(__name__)


def _log(ev: VariantEval) -> None:
    logger.info("%s: %s", ev.name, ", ".join(f"{k}={v:.4f}" for k, v in ev.metrics.items()))
    log_metadata(metadata={"metrics": {k: float(v) for k, v in ev.metrics.items()}})


@step
def evaluate_base(
    stage1_backbone: BackboneDir, data: PreparedData, embeddings: EmbeddingTable,
    stage1: Optional[dict] = None, eval: Optional[dict] = None, seed: int = 0,  # noqa: A002 - the config section's name
) -> Annotated[VariantEval, "eval_base"]:
    """The merged Stage-1 backbone without any prefix: the non-personalized reference."""
    from tapper.experiment import evaluate_base as core_evaluate_base

    quiet()
    install_embeddings(embeddings)
    res = core_evaluate_base(stage1_backbone.path, data, run_config(data, seed, stage1=stage1, eval=eval), progress=False)
    ev = variant_eval(res, data.task.name)
    _log(ev)
    return ev


@step
def evaluate_tapper(
    stage1_backbone: BackboneDir, tapper_state: TapPerState, data: PreparedData, embeddings: EmbeddingTable,
    eval: Optional[dict] = None, seed: int = 0,  # noqa: A002
) -> Annotated[VariantEval, "eval_tapper"]:
    """The trained TAP-PER state, loaded from its artifact, on the Stage-2 users' queries."""
    quiet()
    install_embeddings(embeddings)
    ev = evaluate_state(tapper_state, stage1_backbone.path, data, run_config(data, seed, eval=eval))
    _log(ev)
    return ev


@step
def evaluate_variant(
    variant: str, stage1_backbone: BackboneDir, data: PreparedData, embeddings: EmbeddingTable,
    run: Optional[dict] = None,
) -> Annotated[VariantEval, "eval_variant"]:
    """Any other method `tapper experiment --variants` knows (ablation switches, baselines): trained and evaluated."""
    from tapper.experiment import run_variant

    quiet()
    install_embeddings(embeddings)
    r = dict(run or {})
    r.pop("stage2_users", None)
    cfg = run_config(data, r.pop("seed", 0), **r)
    res = run_variant(variant, stage1_backbone.path, data, cfg, step_tempdir("tapper-variant-"), progress=False)
    ev = variant_eval(res, data.task.name)
    _log(ev)
    return ev


@step
def report(evals: List[VariantEval], stage1_backbone: BackboneDir, data: PreparedData,
           candidate: str = "tap-per") -> Annotated[EvalReport, "evaluation_report"]:
    """All variants side by side (HTML table + loss plot in the dashboard), with what promotion compares."""
    task = data.task
    by_name = {e.name: e for e in evals}
    if candidate not in by_name:
        raise ValueError(f"candidate {candidate!r} was not evaluated; evaluated: {sorted(by_name)}")
    losses = {"stage1": list(stage1_backbone.losses)}
    losses.update({e.name: list(e.losses) for e in evals if e.losses})
    rep = EvalReport(
        task=task.name, primary_metric=task.primary_metric, higher_is_better=task.higher_is_better, candidate=candidate,
        eval_data_hash=eval_data_hash(data), eval_queries=len(data.splits.eval),
        variants={e.name: {k: float(v) for k, v in e.metrics.items()} for e in evals},
        params={e.name: {"per_user": e.per_user_params, "shared": e.shared_params} for e in evals},
        losses=losses,
    )
    logger.info("%s on %d queries: %s %s = %.4f", task.name, rep.eval_queries, candidate, rep.primary_metric, rep.candidate_score)
    return rep
