"""The online_adaptation ZenML pipeline on the tiny backbone, in an isolated ZenML + MLflow store.

A training run first (configs/tiny.yaml), then the online pipeline with the same data and run
settings (configs/online-tiny.yaml): its data, embedding and Stage-1 steps come from the step
cache; the trajectories artifact has the `tapper online` contract's shape; Static is flat; MLflow
has online/<method>/<metric> at step t = 0..T; a rerun through the CLI is served from the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workflow_data import isolated_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ["load_data", "validate_data", "build_splits", "cache_embeddings", "train_stage1"]
METHODS = ["static", "online-emb", "online-full", "full-retrain"]


@pytest.fixture(scope="module")
def zen(tmp_path_factory):
    """An isolated ZenML + MLflow + tapper cache, set up before zenml is first imported."""
    yield from isolated_workflow(tmp_path_factory.mktemp("zen-online"))


def statuses(run):
    return {n: str(s.status.value) for n, s in run.steps.items()}


def trajectories(run):
    return run.steps["online_report"].outputs["online_trajectories"][0]


def test_online_pipeline_after_training_reuses_upstream_steps(zen):
    from zenml.client import Client

    from pipelines.run import resolve_config, resolve_online_config, run_online_pipeline, run_training

    train = resolve_config(ROOT / "configs" / "tiny.yaml", questions=zen["questions"], outputs=zen["outputs"])
    training_run = Client().get_pipeline_run(run_training(train).id)
    assert str(training_run.status.value) == "completed"
    cfg = resolve_online_config(
        ROOT / "configs" / "online-tiny.yaml", questions=zen["questions"], outputs=zen["outputs"]
    )
    assert cfg["parameters"]["run"] == train["parameters"]["run"]
    run = Client().get_pipeline_run(run_online_pipeline(cfg).id)
    zen["runs"]["online"] = run
    s = statuses(run)
    assert str(run.status.value) == "completed", s
    assert all(s[n] == "cached" for n in UPSTREAM), s
    for n in [
        "online_bootstrap",
        "simulate_static",
        "simulate_online_emb",
        "simulate_online_full",
        "simulate_full_retrain",
        "online_report",
    ]:
        assert s[n] == "completed", (n, s)
    # The cached steps are the training run's own step runs' outputs.
    assert (
        run.steps["train_stage1"].outputs["stage1_backbone"][0].id
        == training_run.steps["train_stage1"].outputs["stage1_backbone"][0].id
    )


def test_trajectories_artifact_has_the_contract_shape(zen):
    art = trajectories(zen["runs"]["online"])
    rep = art.load().report
    assert rep["metric"] == "accuracy" and rep["fractions"] == [0.5, 0.75, 1.0]
    assert list(rep["methods"]) == METHODS
    assert all(len(ys) == 3 and all(isinstance(y, float) for y in ys) for ys in rep["methods"].values())
    assert len({ys[0] for ys in rep["methods"].values()}) == 1  # one bootstrap checkpoint: a shared R_0
    assert len(set(rep["methods"]["static"])) == 1  # Static is flat
    cost = rep["cost"]
    assert cost["static"]["params_touched_per_chunk"] == 0
    assert 0 < cost["online-emb"]["params_touched_per_chunk"] < cost["online-full"]["params_touched_per_chunk"]
    assert all(len(cost[m]["per_chunk"]) == 2 for m in METHODS)
    assert "final_gap_full_retrain_minus_online_full" in rep and rep["split"]["users"] == 3
    # Per-query final scores travel in the per-method artifacts, so the pipeline's report pairs the end points too.
    assert rep["final_paired"]["full-retrain - online-full"]["queries"] == rep["split"]["eval_queries"]
    # Dashboard: the Figure-6 PNG and a table; metadata has the final values.
    assert art.load().png.startswith(b"\x89PNG")
    assert len(art.visualizations) == 2
    assert art.run_metadata["metric"] == "accuracy" and "static/final" in art.run_metadata


def test_mlflow_has_per_step_metrics_and_the_plot(zen):
    import mlflow
    from zenml.client import Client

    run = zen["runs"]["online"]
    client = mlflow.MlflowClient(tracking_uri=Client().active_stack.experiment_tracker.get_tracking_uri())
    exp = client.get_experiment_by_name("online_adaptation")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run.name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    rid = runs[0].info.run_id
    rep = trajectories(run).load().report
    for m in METHODS:
        hist = sorted(client.get_metric_history(rid, f"online/{m}/accuracy"), key=lambda x: x.step)
        assert [h.step for h in hist] == [0, 1, 2], (m, hist)
        assert [h.value for h in hist] == pytest.approx(rep["methods"][m])
        assert [h.step for h in client.get_metric_history(rid, f"online/{m}/seconds")] == [1, 2]
    assert runs[0].data.metrics["online/static/params_touched_per_chunk"] == 0
    files = {a.path for a in client.list_artifacts(rid, "online")}
    assert {"online/online.png", "online/trajectories.json"} <= files


def test_cli_rerun_is_served_from_cache(zen, capsys):
    from zenml.client import Client

    from tapper.cli import main

    assert (
        main(
            [
                "online-pipeline",
                "--config",
                str(ROOT / "configs" / "online-tiny.yaml"),
                "--questions",
                zen["questions"],
                "--outputs",
                zen["outputs"],
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "online adaptation" in out and "full-retrain" in out and "online_trajectories" in out
    run = Client().get_pipeline_run(Client().list_pipeline_runs(sort_by="desc:created", size=1)[0].id)
    assert str(run.pipeline.name) == "online_adaptation"
    assert set(statuses(run).values()) == {"cached"}, statuses(run)
    assert trajectories(run).load().report["methods"] == trajectories(zen["runs"]["online"]).load().report["methods"]
