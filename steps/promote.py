"""Registration (MLflow + ZenML Model Control Plane) and metric-gated promotion.

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
(deploy.bundle.export_bundle) to `<serving_dir>/<model name>/v<version>` and
published as `<serving_dir>/<model name>/current` (an atomic symlink swap), where a
server started with `tapper serve --model-dir <serving_dir>/<model name>/current`
picks it up on POST /reload. `serving_dir` is the pipeline parameter of that name,
else `$TAPPER_SERVING_DIR`, else `{TAPPER_HOME}/.tapper/serving`. The bundle path is
recorded in the decision and in the model version's metadata.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

from zenml import get_step_context, log_metadata, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.logger import get_logger

from materializers.types import BackboneDir, EvalReport, PromotionDecision, TapPerState
from tapper.experiment import PreparedData

logger = get_logger(__name__)
MLFLOW_MODEL_FILE = Path(__file__).with_name("mlflow_model.py")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def _mlflow_tracker():
    tracker = Client().active_stack.experiment_tracker
    if tracker is None or tracker.flavor != "mlflow":
        return None
    return tracker


@step(enable_cache=False)
def register_model(
    report: EvalReport, tapper_state: TapPerState, stage1_backbone: BackboneDir,
    run: Optional[dict] = None, backbone: str = "", log_backbone: bool = False, data: Optional[PreparedData] = None,
) -> Annotated[dict, "registration"]:
    """Log the run to MLflow (params, per-epoch losses, metrics, plots, model) and register the model;
    record the metrics on this run's ZenML model version. Never cached: every run is a new version.
    With `data`, the Stage-2 users' histories are logged with the model (artifact `histories`), so that the
    registered model scores DataFrames of user_id, input rows with the users' histories (deploy.batch_scoring)."""
    from tapper.config import load_run_config

    ctx = get_step_context()
    mv = ctx.model
    info: dict[str, Any] = {"zenml_model": mv.name, "zenml_version": str(mv.number)}
    cfg = load_run_config({k: v for k, v in (run or {}).items()}).to_dict()
    if _mlflow_tracker() is not None:
        import mlflow

        from materializers.evaluation import loss_plot_png

        active = mlflow.active_run()
        mlflow.log_params({**_flatten(cfg), "backbone": backbone, "task": report.task, "candidate": report.candidate,
                           "eval_data_hash": report.eval_data_hash[:16], "zenml_model_version": str(mv.number)})
        # The training and evaluation steps log their losses and metrics into this run as they finish; a step
        # served from the cache did not run, so what is missing is logged here from the report.
        logged = set(mlflow.get_run(active.info.run_id).data.metrics) if active else set()
        for stage, losses in report.losses.items():
            if f"loss/{stage}" not in logged:
                for i, loss in enumerate(losses):
                    mlflow.log_metric(f"loss/{stage}", float(loss), step=i + 1)
        mlflow.log_metrics({f"{variant}/{k}": float(v) for variant, ms in report.variants.items() for k, v in ms.items()
                            if f"{variant}/{k}" not in logged})
        mlflow.log_metric(f"candidate/{report.primary_metric}", report.candidate_score)
        mlflow.log_dict(asdict(report), "evaluation/report.json")
        table = evaluation_table(report)
        mlflow.log_table(data=table, artifact_file="evaluation/variants.json")
        with tempfile.TemporaryDirectory(prefix="tapper-mlflow-") as tmp:
            png = loss_plot_png(report.losses)
            if png:
                Path(tmp, "losses.png").write_bytes(png)
                mlflow.log_artifact(str(Path(tmp, "losses.png")), "plots")
            ref = Path(tmp, "backbone.json")
            ref.write_text(json.dumps({"task": report.task, "uri": str(stage1_backbone.path), "spec": stage1_backbone.spec,
                                       "weights_hash": stage1_backbone.weights_hash}))
            artifacts = {"tapper_state": str(tapper_state.path), "backbone_ref": str(ref)}
            histories = stage2_histories(data) if data is not None else {}
            if histories:
                from deploy.histories import write_histories

                artifacts["histories"] = str(write_histories(Path(tmp, "histories.jsonl"), histories))
            if log_backbone:
                artifacts["stage1_backbone"] = str(stage1_backbone.path)
            name = mv.name
            said = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stderr(said):
                # The signature is given in full; an input example would make MLflow load the backbone and
                # predict once more here only to check what the signature already says.
                warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
                model_info = mlflow.pyfunc.log_model(
                    name="tapper", python_model=str(MLFLOW_MODEL_FILE), artifacts=artifacts,
                    registered_model_name=name, pip_requirements=["tapper"], signature=model_signature(report.task),
                    metadata={"task": report.task, "zenml_model_version": str(mv.number)},
                )
            # MLflow prints "Successfully registered model ..." to stderr, which the dashboard shows as red ERROR rows.
            for line in said.getvalue().splitlines():
                if line.strip():
                    logger.info("MLflow: %s", line.strip())
        version = str(model_info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, version, "zenml_model_version", str(mv.number))
        client.set_model_version_tag(name, version, f"{report.primary_metric}", f"{report.candidate_score:.6f}")
        client.update_model_version(name, version, description=model_description(report, backbone, str(mv.number), table))
        if not (client.get_registered_model(name).description or ""):
            client.update_registered_model(name, description=f"TAP-PER personalization model for {report.task} "
                                           "(tapper). Each version's description holds its evaluation table.")
        info.update({"mlflow_run_id": active.info.run_id if active else "", "mlflow_model": name, "mlflow_version": version,
                     "mlflow_model_uri": model_info.model_uri, "tracking_uri": mlflow.get_tracking_uri()})
        logger.info("MLflow: registered %s version %s (run %s)", name, version, info["mlflow_run_id"])
    else:
        logger.warning("the active stack has no MLflow experiment tracker: nothing logged to MLflow (run `tapper stack up local`)")
    log_metadata(metadata={
        "task": report.task, "primary_metric": report.primary_metric, "candidate_score": report.candidate_score,
        "higher_is_better": report.higher_is_better, "eval_data_hash": report.eval_data_hash,
        "eval_queries": report.eval_queries, "metrics": report.variants, "backbone": backbone,
        "per_user_params": tapper_state.per_user_params, "shared_params": tapper_state.shared_params,
        "backbone_hash": stage1_backbone.weights_hash, **{k: v for k, v in info.items() if k.startswith("mlflow")},
    }, infer_model=True)
    return info


def evaluation_table(report: EvalReport) -> dict[str, list]:
    """The evaluation as columns (MLflow's table format): one row per variant, its metrics and its paired
    difference in the primary metric to the base (mean and 95 % interval)."""
    names = list(report.variants)
    metrics = list(next(iter(report.variants.values())).keys()) if names else []
    pairs = (report.paired or {}).get("pairs", {})
    table: dict[str, list] = {"variant": names}
    for m in metrics:
        table[m] = [round(float(report.variants[v][m]), 6) for v in names]
    vs_base = [pairs.get(f"{v} - base", {}).get("all") for v in names]
    table[f"{report.primary_metric} - base"] = [None if st is None else round(st["mean"], 6) for st in vs_base]
    table["95% interval"] = [None if st is None else f"[{st['ci95'][0]:+.3f}, {st['ci95'][1]:+.3f}]" for st in vs_base]
    table["queries"] = [report.eval_queries] * len(names)
    return table


def model_description(report: EvalReport, backbone: str, zenml_version: str, table: dict[str, list]) -> str:
    """The MLflow model version's description: what it is, on what it was evaluated, and the evaluation table."""
    cols = list(table)
    lines = [
        f"TAP-PER ({report.candidate}) for {report.task} on the {backbone or 'configured'} backbone; ZenML model "
        f"version {zenml_version}. Primary metric {report.primary_metric} = {report.candidate_score:.4f} on "
        f"{report.eval_queries} evaluation queries (data hash {report.eval_data_hash[:12]}).",
        "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols),
    ]
    for i in range(len(table["variant"])):
        lines.append("| " + " | ".join("" if table[c][i] is None else str(table[c][i]) for c in cols) + " |")
    refs = "; ".join(f"{v['what']}: {v['score']:.4f}" for v in (report.references or {}).values())
    if refs:
        lines += ["", f"Reference (labels alone): {refs}."]
    lines += ["", "Input: LaMP questions (id, input, user_id, profile records); output: the answer text. "
              "Artifacts: tapper_state/ (prefix table, DIN, bridge), backbone.json (where the merged Stage-1 backbone is)."]
    return "\n".join(lines)


def model_signature(task: str):
    """The pyfunc model's signature: LaMP questions of `task` in (id, input, user_id, profile records with the
    task's fields), one answer string per question out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

    from tapper.data import get_task

    fields = [Property(f, "string", required=False) for f in get_task(task).profile_fields]
    record = Object([Property("id", "string"), Property("date", "string", required=False), *fields])
    inputs = Schema([ColSpec("string", "id"), ColSpec("string", "input"), ColSpec("string", "user_id", required=False),
                     ColSpec(Array(record), "profile")])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]))


def serving_root(serving_dir: Optional[str] = None) -> Path:
    from pipelines.stacks import project_root

    return Path(serving_dir or os.environ.get("TAPPER_SERVING_DIR") or project_root() / ".tapper" / "serving").expanduser()


def stage2_histories(data: PreparedData) -> dict:
    """{user: records} of the evaluation users, chronological: each evaluation query carries its user's full history."""
    from tapper.data.chronology import sort_chronologically

    histories: dict = {}
    for ex in data.splits.eval:
        if len(ex.history) > len(histories.get(ex.user_id, [])):
            histories[ex.user_id] = list(ex.history)
    return {u: sort_chronologically(recs) for u, recs in histories.items()}


def export_serving_bundle(model_name: str, version: str, tapper_state: TapPerState, stage1_backbone: BackboneDir,
                          data: PreparedData, serving_dir: Optional[str] = None,
                          source: Optional[dict] = None) -> tuple[Path, Path]:
    """Write `<root>/<model>/v<version>` (the Stage-2 users' histories included) and point `<root>/<model>/current` at it."""
    from deploy.bundle import export_bundle, publish_bundle
    from tapper.data import get_task

    root = serving_root(serving_dir) / model_name
    histories = stage2_histories(data)
    template = data.task.input_template if data.task.input_template != get_task(data.task.name).input_template else None
    info = export_bundle(stage1_backbone.path, tapper_state.path, data.task.name, root / f"v{version}",
                         version=f"{model_name}/{version}", histories=histories or None, input_template=template,
                         source={"zenml_model": model_name, "zenml_model_version": str(version), **(source or {})},
                         overwrite=True)
    link = publish_bundle(info.path, root / "current")
    logger.info("serving bundle %s published as %s", info.path, link)
    return info.path, link


def _export_into(decision: PromotionDecision, state: TapPerState, stage1: BackboneDir, data: PreparedData,
                 serving_dir: Optional[str], source: dict) -> None:
    try:
        path, link = export_serving_bundle(decision.model_name, decision.model_version, state, stage1, data, serving_dir, source)
        decision.bundle_path, decision.serving_link = str(path), str(link)
    except Exception as err:  # noqa: BLE001 - the promotion stands; the decision says why serving was not updated
        decision.bundle_error = f"{type(err).__name__}: {err}"
        logger.error("promoted, but the serving bundle could not be exported: %s", decision.bundle_error)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def is_better(new: float, old: float, higher_is_better: bool) -> bool:
    return new > old if higher_is_better else new < old


# `promote_if`, the pipeline parameter: "better" (the default) promotes a strictly better primary metric;
# "significantly-better" also needs the paired 95 % interval of candidate - production to exclude no change.
PROMOTE_IF = ("better", "significantly-better")


def passes_gate(new: float, old: float, higher_is_better: bool, paired: dict | None, promote_if: str) -> tuple[bool, str]:
    """(promote?, why not) for a candidate scoring `new` against production's `old`."""
    if promote_if not in PROMOTE_IF:
        raise ValueError(f"promote_if must be one of {list(PROMOTE_IF)}, got {promote_if!r}")
    if not is_better(new, old, higher_is_better):
        return False, "does not beat"
    if promote_if == "better":
        return True, ""
    if paired is None:
        return False, "beats, but cannot be paired with (no per-query scores for both), so is not significantly better than"
    lo, hi = paired["ci95"]
    if (lo > 0) if higher_is_better else (hi < 0):
        return True, ""
    return False, "beats, but its paired 95 % interval includes no change, so is not significantly better than"


def production_score(prod, report: EvalReport, data: PreparedData,
                     run: Optional[dict]) -> tuple[float | None, str, dict[str, float]]:
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
        from tapper.experiment import query_scores

        state: TapPerState = prod.get_artifact("tapper_state").load()
        s1: BackboneDir = prod.get_artifact("stage1_backbone").load()
        r = dict(run or {})
        ev = evaluate_state(state, s1.path, data, run_config(data, r.get("seed", 0), eval=r.get("eval")))
        return (float(ev.metrics[report.primary_metric]), "re-evaluated on this run's evaluation data",
                query_scores(data, ev.predictions))
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
def promote(report: EvalReport, registration: dict, data: PreparedData, tapper_state: TapPerState,
            stage1_backbone: BackboneDir, run: Optional[dict] = None,
            serving_dir: Optional[str] = None, promote_if: str = "better") -> Annotated[PromotionDecision, "promotion_decision"]:
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
        model_name=mv.name, model_version=str(mv.number), promoted=False, reason="", metric=report.primary_metric,
        higher_is_better=report.higher_is_better, candidate_score=new,
        mlflow_model=registration.get("mlflow_model"), mlflow_version=registration.get("mlflow_version"),
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
                decision.reason = f"{report.primary_metric} {new:.4f} beats production v{prod.number}'s {old:.4f} ({how})"
            else:
                decision.reason = (f"not promoted: {report.primary_metric} {new:.4f} {why_not} "
                                   f"production v{prod.number}'s {old:.4f} ({how})")
    decision.decided_at = _now()
    if decision.promoted:
        decision.archived_version = set_production(mv.name, str(mv.number), registration, forced=False)
        _export_into(decision, tapper_state, stage1_backbone, data, serving_dir,
                     {k: str(v) for k, v in registration.items() if k.startswith("mlflow")})
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
        model_name=model_name, model_version=str(mv.number), promoted=True, forced=True,
        reason=f"forced by hand (tapper promote {mv.number}) by {os.environ.get('USER', 'unknown user')}",
        metric=str(meta.get("primary_metric", "")), higher_is_better=bool(meta.get("higher_is_better", True)),
        candidate_score=float(meta.get("candidate_score", float("nan"))),
        production_version=str(prod.number) if prod is not None else None,
        production_score=float((prod.run_metadata or {}).get("candidate_score")) if prod is not None and (prod.run_metadata or {}).get("candidate_score") is not None else None,
        archived_version=archived, mlflow_model=meta.get("mlflow_model"), decided_at=_now(),
        mlflow_version=None if meta.get("mlflow_version") is None else str(meta.get("mlflow_version")),
    )
    try:
        state: TapPerState = mv.get_artifact("tapper_state").load()
        s1: BackboneDir = mv.get_artifact("stage1_backbone").load()
        data: PreparedData = mv.get_artifact("prepared_data").load()
        _export_into(d, state, s1, data, None, {"promotion": "forced"})
    except Exception as err:  # noqa: BLE001 - e.g. a version whose artifacts are gone: promoted, no bundle
        d.bundle_error = f"{type(err).__name__}: {err}"
    log_metadata(metadata={"promotion_forced": {k: v for k, v in asdict(d).items() if v is not None}},
                 model_name=model_name, model_version=str(mv.number))
    return d
