"""Registration: log the run to MLflow (params, losses, metrics, plots, the pyfunc model) and register the model
version; record the metrics on this run's ZenML model version. The model's text comes from the core
(tapper.eval.model_card); the pyfunc model class is pipelines/mlflow_model.py (logged from its file, never imported).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

from zenml import get_step_context, log_metadata, step
from zenml.client import Client
from zenml.logger import get_logger

from materializers.types import BackboneDir, EvalReport, TapPerState
from tapper.data.prepared import PreparedData
from tapper.eval.model_card import evaluation_table, model_description

logger = get_logger(__name__)
# MLflow's models-from-code: the class is logged as a file and loaded from it where the model is served.
MLFLOW_MODEL_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "mlflow_model.py"


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
    report: EvalReport,
    tapper_state: TapPerState,
    stage1_backbone: BackboneDir,
    run: Optional[dict] = None,
    backbone: str = "",
    log_backbone: bool = False,
    data: Optional[PreparedData] = None,
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
        mlflow.log_params(
            {
                **_flatten(cfg),
                "backbone": backbone,
                "task": report.task,
                "candidate": report.candidate,
                "eval_data_hash": report.eval_data_hash[:16],
                "zenml_model_version": str(mv.number),
            }
        )
        # The training and evaluation steps log their losses and metrics into this run as they finish; a step
        # served from the cache did not run, so what is missing is logged here from the report.
        logged = set(mlflow.get_run(active.info.run_id).data.metrics) if active else set()
        for stage, losses in report.losses.items():
            if f"loss/{stage}" not in logged:
                for i, loss in enumerate(losses):
                    mlflow.log_metric(f"loss/{stage}", float(loss), step=i + 1)
        mlflow.log_metrics(
            {
                f"{variant}/{k}": float(v)
                for variant, ms in report.variants.items()
                for k, v in ms.items()
                if f"{variant}/{k}" not in logged
            }
        )
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
            ref.write_text(
                json.dumps(
                    {
                        "task": report.task,
                        "uri": str(stage1_backbone.path),
                        "spec": stage1_backbone.spec,
                        "weights_hash": stage1_backbone.weights_hash,
                    }
                )
            )
            artifacts = {"tapper_state": str(tapper_state.path), "backbone_ref": str(ref)}
            histories = stage2_histories(data) if data is not None else {}
            if histories:
                from tapper.data.history_file import write_histories

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
                    name="tapper",
                    python_model=str(MLFLOW_MODEL_FILE),
                    artifacts=artifacts,
                    registered_model_name=name,
                    pip_requirements=["tapper"],
                    signature=model_signature(report.task),
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
        client.update_model_version(
            name, version, description=model_description(report, backbone, str(mv.number), table)
        )
        if not (client.get_registered_model(name).description or ""):
            client.update_registered_model(
                name,
                description=f"TAP-PER personalization model for {report.task} "
                "(tapper). Each version's description holds its evaluation table.",
            )
        info.update(
            {
                "mlflow_run_id": active.info.run_id if active else "",
                "mlflow_model": name,
                "mlflow_version": version,
                "mlflow_model_uri": model_info.model_uri,
                "tracking_uri": mlflow.get_tracking_uri(),
            }
        )
        logger.info("MLflow: registered %s version %s (run %s)", name, version, info["mlflow_run_id"])
    else:
        logger.warning(
            "the active stack has no MLflow experiment tracker: nothing logged to MLflow (run `tapper stack up local`)"
        )
    log_metadata(
        metadata={
            "task": report.task,
            "primary_metric": report.primary_metric,
            "candidate_score": report.candidate_score,
            "higher_is_better": report.higher_is_better,
            "eval_data_hash": report.eval_data_hash,
            "eval_queries": report.eval_queries,
            "metrics": report.variants,
            "backbone": backbone,
            "per_user_params": tapper_state.per_user_params,
            "shared_params": tapper_state.shared_params,
            "backbone_hash": stage1_backbone.weights_hash,
            **{k: v for k, v in info.items() if k.startswith("mlflow")},
        },
        infer_model=True,
    )
    return info


def model_signature(task: str):
    """The pyfunc model's signature: LaMP questions of `task` in (id, input, user_id, profile records with the
    task's fields), one answer string per question out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

    from tapper.data import get_task

    fields = [Property(f, "string", required=False) for f in get_task(task).profile_fields]
    record = Object([Property("id", "string"), Property("date", "string", required=False), *fields])
    inputs = Schema(
        [
            ColSpec("string", "id"),
            ColSpec("string", "input"),
            ColSpec("string", "user_id", required=False),
            ColSpec(Array(record), "profile"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]))


def stage2_histories(data: PreparedData) -> dict:
    """{user: records} of the evaluation users, chronological: each evaluation query carries its user's full history."""
    from tapper.data.chronology import sort_chronologically

    histories: dict = {}
    for ex in data.splits.eval:
        if len(ex.history) > len(histories.get(ex.user_id, [])):
            histories[ex.user_id] = list(ex.history)
    return {u: sort_chronologically(recs) for u, recs in histories.items()}
