"""Online-adaptation steps (paper 4.6, Figure 6): the bootstrap checkpoint, one step per method
(Static, Online-Emb, Online-Full, Full-Retrain), and the trajectories report.

They run after the training pipeline's upstream steps (load -> validate -> splits -> embeddings ->
Stage 1), invoked with the same parameters, so those come from the step cache. The simulation
itself is tapper.online (the same update code the serving stack runs on feedback); these steps
only split it into cacheable pieces, log to MLflow and store the result.

MLflow (when the active stack has an MLflow tracker): `online/<method>/<metric>` at step=t
(t = 0..T chunks absorbed), `online/<method>/params_touched` and `online/<method>/seconds` at
step=t (t = 1..T), and from the report step the cost summary, the final gap, trajectories.json
and online.png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, List, Optional, Tuple

from zenml import log_metadata, step
from zenml.logger import get_logger

from materializers.types import BackboneDir, EmbeddingTable, OnlineTrajectories, TapPerState
from steps._core import active_mlflow as _mlflow
from steps._core import install_embeddings, quiet, step_tempdir
from tapper.experiment import PreparedData

logger = get_logger(__name__)


def online_configs(data: PreparedData, run: Optional[dict], online: Optional[dict]):
    """(RunConfig, OnlineConfig) from the pipeline's `run` and `online` parameters (unknown keys are errors)."""
    from tapper.online import load_online_config

    r = dict(run or {})
    r["stage2_users"] = len(data.splits.stage2_users)
    return load_online_config({**r, "online": dict(online or {})})


@step
def online_bootstrap(
    stage1_backbone: BackboneDir,
    data: PreparedData,
    embeddings: EmbeddingTable,
    run: Optional[dict] = None,
    online: Optional[dict] = None,
) -> Tuple[Annotated[TapPerState, "online_bootstrap_state"], Annotated[dict, "online_bootstrap_metrics"]]:
    """Stage 2 on the earlier half of every evaluation user's history; R_0 on the test queries."""
    from tapper.model.backbone import load_backbone_dir
    from tapper.model.tapper import TapPer
    from tapper.online import stream_split, train_bootstrap

    quiet()
    install_embeddings(embeddings)
    cfg, ocfg = online_configs(data, run, online)
    split = stream_split(data, ocfg.chunks)
    logger.info("online split: %s", split.describe())
    path, r0, seconds = train_bootstrap(
        stage1_backbone.path, split, data, cfg, ocfg, step_tempdir("tapper-online-") / "bootstrap", progress=False
    )
    model = TapPer.load(path, load_backbone_dir(stage1_backbone.path).model)
    state = TapPerState(
        path=Path(path),
        variant="bootstrap",
        backbone_hash=stage1_backbone.weights_hash,
        users=len(model.user_ids),
        per_user_params=model.per_user_params(),
        shared_params=model.shared_params(),
        n_train=len(split.seen_examples(0)),
        lambda_t=float(model.prefix.lambda_t),
        lambda_o=float(model.prefix.lambda_o),
        seconds=seconds,
    )
    logger.info("bootstrap R_0: %s (%.1f s)", r0, seconds)
    log_metadata(
        metadata={"online_bootstrap": {"metrics": r0, "seconds": round(seconds, 3), "split": split.describe()}}
    )
    return state, {
        "metrics": {k: float(v) for k, v in r0.items()},
        "seconds": round(seconds, 4),
        "split": split.describe(),
    }


@step
def online_method(
    method: str,
    stage1_backbone: BackboneDir,
    bootstrap_state: TapPerState,
    bootstrap_metrics: dict,
    data: PreparedData,
    embeddings: EmbeddingTable,
    run: Optional[dict] = None,
    online: Optional[dict] = None,
) -> Annotated[dict, "online_trajectory"]:
    """One method's trajectory R_0..R_T from the bootstrap checkpoint (tapper.online.simulate_method)."""
    from tapper.online import simulate_method, stream_split

    quiet()
    install_embeddings(embeddings)
    cfg, ocfg = online_configs(data, run, online)
    split = stream_split(data, ocfg.chunks)
    mlflow = _mlflow()

    def on_step(m: str, t: int, fraction: float, metrics: dict) -> None:
        logger.info("%s t=%d (%.0f%% absorbed): %s", m, t, 100 * fraction, metrics)
        if mlflow is not None:
            mlflow.log_metrics({f"online/{m}/{k}": float(v) for k, v in metrics.items()}, step=t)

    traj = simulate_method(
        method,
        stage1_backbone.path,
        bootstrap_state.path,
        bootstrap_metrics["metrics"],
        split,
        data,
        cfg,
        ocfg,
        progress=False,
        on_step=on_step,
    )
    if mlflow is not None:
        for t, c in enumerate(traj.cost, start=1):
            mlflow.log_metrics(
                {
                    f"online/{method}/params_touched": float(c["params_touched"]),
                    f"online/{method}/seconds": float(c["seconds"]),
                },
                step=t,
            )
    primary = data.task.primary_metric
    log_metadata(
        metadata={
            "online": {
                "method": method,
                primary: [r[primary] for r in traj.metrics],
                "params_touched_per_chunk": max((c["params_touched"] for c in traj.cost), default=0),
                "seconds_per_chunk": [c["seconds"] for c in traj.cost],
            }
        }
    )
    return traj.to_dict()


@step
def online_report(
    trajectories: List[dict],
    bootstrap_metrics: dict,
    stage1_backbone: BackboneDir,
    data: PreparedData,
    backbone: str = "",
    run: Optional[dict] = None,
    online: Optional[dict] = None,
) -> Annotated[OnlineTrajectories, "online_trajectories"]:
    """trajectories.json ({"metric", "fractions", "methods": {method: [R_0..R_T]}, cost, ...}) + the Figure-6 plot."""
    from tapper.online import Trajectory, plot_trajectories, stream_split, trajectories_report

    cfg, ocfg = online_configs(data, run, online)
    split = stream_split(data, ocfg.chunks)
    trajs = {d["method"]: Trajectory.from_dict(d) for d in trajectories}
    report = trajectories_report(
        split,
        trajs,
        data.task,
        {
            "task": data.task.name,
            "backbone": backbone,
            "stage1": {"weights_hash": stage1_backbone.weights_hash},
            "bootstrap": {"metrics": bootstrap_metrics["metrics"], "seconds": bootstrap_metrics["seconds"]},
            "config": {**cfg.to_dict(), "online": ocfg.to_dict()},
        },
    )
    with tempfile.TemporaryDirectory(prefix="tapper-online-plot-") as tmp:
        png = plot_trajectories(report, Path(tmp) / "online.png").read_bytes()
        mlflow = _mlflow()
        if mlflow is not None:
            Path(tmp, "trajectories.json").write_text(__import__("json").dumps(report, indent=1))
            mlflow.log_artifact(str(Path(tmp, "online.png")), "online")
            mlflow.log_artifact(str(Path(tmp, "trajectories.json")), "online")
            for m, c in report["cost"].items():
                mlflow.log_metrics(
                    {
                        f"online/{m}/params_touched_per_chunk": float(c["params_touched_per_chunk"]),
                        f"online/{m}/seconds_per_chunk": float(c["seconds_per_chunk"]),
                        f"online/{m}/final_{report['metric']}": float(report["methods"][m][-1]),
                    }
                )
            if "final_gap_full_retrain_minus_online_full" in report:
                mlflow.log_metric(
                    "online/final_gap_full_retrain_minus_online_full",
                    float(report["final_gap_full_retrain_minus_online_full"]),
                )
    finals = {m: round(ys[-1], 4) for m, ys in report["methods"].items()}
    logger.info("online adaptation (%s, final): %s", report["metric"], finals)
    return OnlineTrajectories(report=report, png=png)
