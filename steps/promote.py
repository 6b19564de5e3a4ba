"""Metric-gated promotion (the gate: tapper.eval.promotion; registration: steps/register.py).

Promotion compares the new version's primary metric (accuracy / MAE / ROUGE-1,
per task) with the current production version's *on the same evaluation
data*: when the production version was evaluated on other data, it is
re-evaluated on this run's evaluation split from its own artifacts. Only a
strictly better model is promoted: ZenML stage `production` (the previous
production version is archived) and MLflow alias `production` (the previous
version gets alias `archived-<n>` and tag stage=archived). The decision and
both figures are recorded as metadata on the model version and as an artifact,
with the two models paired on the same queries (mean difference and a 95 %
paired-bootstrap interval, tapper.eval.paired) when both per-query scores are
known: a gate on a handful of queries can promote noise, and the interval says
how much of the difference the queries can resolve. With the pipeline parameter
`promote_if: significantly-better` (default `better`) the interval must also
exclude no change for a promotion.

A promoted version (metric-gated or forced) is also exported as a serving bundle
(tapper.bundle.export_bundle) to `<serving_dir>/<model name>/v<version>` and
published as `<serving_dir>/<model name>/current` (an atomic symlink swap), where a
server started with `tapper serve --model-dir <serving_dir>/<model name>/current`
picks it up on POST /reload. `serving_dir` is the pipeline parameter of that name,
else `$TAPPER_SERVING_DIR`, else `{TAPPER_HOME}/.tapper/serving`. The bundle path is
recorded in the decision and in the model version's metadata.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

from zenml import get_step_context, log_metadata, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.logger import get_logger

from materializers.types import BackboneDir, EvalReport, PromotionDecision, TapPerState
from steps.register import _mlflow_tracker, stage2_histories
from tapper.data.prepared import PreparedData
from tapper.eval.promotion import PROMOTE_IF, is_better, passes_gate  # noqa: F401  (PROMOTE_IF: run setup checks it)

logger = get_logger(__name__)


def serving_root(serving_dir: Optional[str] = None) -> Path:
    from tapper.paths import project_root

    return Path(
        serving_dir or os.environ.get("TAPPER_SERVING_DIR") or project_root() / ".tapper" / "serving"
    ).expanduser()


def export_serving_bundle(
    model_name: str,
    version: str,
    tapper_state: TapPerState,
    stage1_backbone: BackboneDir,
    data: PreparedData,
    serving_dir: Optional[str] = None,
    source: Optional[dict] = None,
) -> tuple[Path, Path]:
    """Write `<root>/<model>/v<version>` (the Stage-2 users' histories included) and point `<root>/<model>/current`
    at it."""
    from tapper.bundle import export_bundle, publish_bundle
    from tapper.data import get_task

    root = serving_root(serving_dir) / model_name
    histories = stage2_histories(data)
    template = data.task.input_template if data.task.input_template != get_task(data.task.name).input_template else None
    info = export_bundle(
        stage1_backbone.path,
        tapper_state.path,
        data.task.name,
        root / f"v{version}",
        version=f"{model_name}/{version}",
        histories=histories or None,
        input_template=template,
        source={"zenml_model": model_name, "zenml_model_version": str(version), **(source or {})},
        overwrite=True,
    )
    link = publish_bundle(info.path, root / "current")
    logger.info("serving bundle %s published as %s", info.path, link)
    return info.path, link


def _export_into(
    decision: PromotionDecision,
    state: TapPerState,
    stage1: BackboneDir,
    data: PreparedData,
    serving_dir: Optional[str],
    source: dict,
) -> None:
    try:
        path, link = export_serving_bundle(
            decision.model_name, decision.model_version, state, stage1, data, serving_dir, source
        )
        decision.bundle_path, decision.serving_link = str(path), str(link)
    except Exception as err:  # noqa: BLE001 - the promotion stands; the decision says why serving was not updated
        decision.bundle_error = f"{type(err).__name__}: {err}"
        logger.error("promoted, but the serving bundle could not be exported: %s", decision.bundle_error)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def production_score(
    prod, report: EvalReport, data: PreparedData, run: Optional[dict]
) -> tuple[float | None, str, dict[str, float]]:
    """The production version's primary metric on this run's evaluation data (recorded, or re-measured), how it
    was obtained, and its per-query scores on those queries (empty when its recorded report has none)."""
    meta = prod.run_metadata or {}
    if meta.get("eval_data_hash") == report.eval_data_hash and meta.get("candidate_score") is not None:
        try:
            per_query = dict(prod.get_artifact("evaluation_report").load().candidate_per_query)
        except Exception:  # noqa: BLE001 - a version whose report is gone: the figure alone still compares
            per_query = {}
        return float(meta["candidate_score"]), "recorded on the same evaluation data", per_query
    try:
        from steps._core import evaluate_state, run_config
        from tapper.methods.result import query_scores

        state: TapPerState = prod.get_artifact("tapper_state").load()
        s1: BackboneDir = prod.get_artifact("stage1_backbone").load()
        r = dict(run or {})
        ev = evaluate_state(state, s1.path, data, run_config(data, r.get("seed", 0), eval=r.get("eval")))
        return (
            float(ev.metrics[report.primary_metric]),
            "re-evaluated on this run's evaluation data",
            query_scores(data, ev.predictions),
        )
    except Exception as err:  # noqa: BLE001 - any failure means the two cannot be compared
        return None, f"production could not be evaluated on this run's data ({type(err).__name__}: {err})", {}


def set_production(model_name: str, version: str, registration: dict | None, forced: bool) -> Optional[str]:
    """ZenML stage + MLflow alias; returns the archived previous production version (ZenML number), if any."""
    client = Client()
    try:
        previous = client.get_model_version(model_name, ModelStages.PRODUCTION)
    except KeyError:
        previous = None
    mv = client.get_model_version(model_name, version)
    mv.set_stage(ModelStages.PRODUCTION, force=True)  # force: the previous production version is archived
    archived = str(previous.number) if previous is not None and previous.id != mv.id else None
    reg = registration or dict(mv.run_metadata or {})
    if _mlflow_tracker() is not None and reg.get("mlflow_model") and reg.get("mlflow_version"):
        import mlflow

        _mlflow_tracker().configure_mlflow()
        mc = mlflow.MlflowClient()
        name, mver = reg["mlflow_model"], str(reg["mlflow_version"])
        try:
            old = mc.get_model_version_by_alias(name, "production")
        except Exception:  # noqa: BLE001 - no alias yet
            old = None
        if old is not None and str(old.version) != mver:
            mc.set_model_version_tag(name, old.version, "stage", "archived")
            mc.set_registered_model_alias(name, f"archived-{old.version}", old.version)
        mc.set_registered_model_alias(name, "production", mver)
        mc.set_model_version_tag(name, mver, "stage", "production")
        mc.set_model_version_tag(name, mver, "promotion", "forced" if forced else "metric-gated")
    return archived


@step(enable_cache=False)
def promote(
    report: EvalReport,
    registration: dict,
    data: PreparedData,
    tapper_state: TapPerState,
    stage1_backbone: BackboneDir,
    run: Optional[dict] = None,
    serving_dir: Optional[str] = None,
    promote_if: str = "better",
) -> Annotated[PromotionDecision, "promotion_decision"]:
    """Promote this run's model version only if its primary metric beats production's on the same data (and,
    with promote_if="significantly-better", its paired interval excludes no change); a promoted version is
    exported as a serving bundle and published as `<serving_dir>/<model>/current`."""
    mv = get_step_context().model
    client = Client()
    try:
        prod = client.get_model_version(mv.name, ModelStages.PRODUCTION)
    except KeyError:
        prod = None
    new = report.candidate_score
    decision = PromotionDecision(
        model_name=mv.name,
        model_version=str(mv.number),
        promoted=False,
        reason="",
        metric=report.primary_metric,
        higher_is_better=report.higher_is_better,
        candidate_score=new,
        mlflow_model=registration.get("mlflow_model"),
        mlflow_version=registration.get("mlflow_version"),
        promote_if=promote_if,
    )
    if prod is None:
        decision.promoted, decision.reason = True, "no production version yet: the first model becomes production"
    else:
        decision.production_version = str(prod.number)
        old, how, prod_per_query = production_score(prod, report, data, run)
        decision.production_score = old
        if report.candidate_per_query and prod_per_query:
            from tapper.eval.paired import describe, paired_difference

            decision.paired = paired_difference(report.candidate_per_query, prod_per_query)
            how += f"; paired on the same queries, candidate - production = {describe(decision.paired, 4)}"
        if old is None:
            decision.reason = f"not promoted: {how}; promote by hand with `tapper promote {mv.number}` if intended"
        else:
            ok, why_not = passes_gate(new, old, report.higher_is_better, decision.paired, promote_if)
            if ok:
                decision.promoted = True
                decision.reason = (
                    f"{report.primary_metric} {new:.4f} beats production v{prod.number}'s {old:.4f} ({how})"
                )
            else:
                decision.reason = (
                    f"not promoted: {report.primary_metric} {new:.4f} {why_not} "
                    f"production v{prod.number}'s {old:.4f} ({how})"
                )
    decision.decided_at = _now()
    if decision.promoted:
        decision.archived_version = set_production(mv.name, str(mv.number), registration, forced=False)
        _export_into(
            decision,
            tapper_state,
            stage1_backbone,
            data,
            serving_dir,
            {k: str(v) for k, v in registration.items() if k.startswith("mlflow")},
        )
    logger.info("promotion: %s", decision.reason)
    log_metadata(metadata={"promotion": {k: v for k, v in asdict(decision).items() if v is not None}}, infer_model=True)
    return decision


def force_promote(model_name: str, version: str) -> PromotionDecision:
    """`tapper promote <version>`: make a version production by hand; recorded as forced."""
    client = Client()
    mv = client.get_model_version(model_name, version)
    meta = dict(mv.run_metadata or {})
    try:
        prod = client.get_model_version(model_name, ModelStages.PRODUCTION)
    except KeyError:
        prod = None
    archived = set_production(model_name, str(mv.number), None, forced=True)
    d = PromotionDecision(
        model_name=model_name,
        model_version=str(mv.number),
        promoted=True,
        forced=True,
        reason=f"forced by hand (tapper promote {mv.number}) by {os.environ.get('USER', 'unknown user')}",
        metric=str(meta.get("primary_metric", "")),
        higher_is_better=bool(meta.get("higher_is_better", True)),
        candidate_score=float(meta.get("candidate_score", float("nan"))),
        production_version=str(prod.number) if prod is not None else None,
        production_score=float((prod.run_metadata or {}).get("candidate_score"))
        if prod is not None and (prod.run_metadata or {}).get("candidate_score") is not None
        else None,
        archived_version=archived,
        mlflow_model=meta.get("mlflow_model"),
        decided_at=_now(),
        mlflow_version=None if meta.get("mlflow_version") is None else str(meta.get("mlflow_version")),
    )
    try:
        state: TapPerState = mv.get_artifact("tapper_state").load()
        s1: BackboneDir = mv.get_artifact("stage1_backbone").load()
        data: PreparedData = mv.get_artifact("prepared_data").load()
        _export_into(d, state, s1, data, None, {"promotion": "forced"})
    except Exception as err:  # noqa: BLE001 - e.g. a version whose artifacts are gone: promoted, no bundle
        d.bundle_error = f"{type(err).__name__}: {err}"
    log_metadata(
        metadata={"promotion_forced": {k: v for k, v in asdict(d).items() if v is not None}},
        model_name=model_name,
        model_version=str(mv.number),
    )
    return d
