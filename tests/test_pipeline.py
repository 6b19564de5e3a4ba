"""The ZenML workflow end to end on the tiny backbone, in an isolated ZenML store.

One module-scoped store; the tests run in order and build on each other:
a bad model first (promoted: nothing in production), a better one (promoted),
an identical rerun (served from the cache), a Stage-2-only change (data,
embeddings and Stage 1 reused), the bad model again (not promoted), a
corrupted file (stopped before a run starts), then the CLI's lineage and
forced promotion. A run that fails validation inside the pipeline: tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from workflow_data import isolated_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOOD = []  # configs/tiny.yaml as it is
BAD = ["stage1.skip=true", "stage2.lr=0.000000001", "stage2.epochs=1", "stage2.max_examples_per_user=1"]
COMPUTE_STEPS = [
    "load_data",
    "validate_data",
    "build_splits",
    "cache_embeddings",
    "train_stage1",
    "train_stage2",
    "evaluate_base",
    "evaluate_tapper",
    "report",
]


@pytest.fixture(scope="module")
def zen(tmp_path_factory):
    """An isolated ZenML + MLflow + tapper cache, set up before zenml is first imported."""
    assert "zenml.client" not in sys.modules or os.environ.get("ZENML_CONFIG_PATH"), (
        "zenml was imported before the store was isolated"
    )
    yield from isolated_workflow(tmp_path_factory.mktemp("zen"))


def train(zen, overrides, name, questions=None):
    from zenml.client import Client

    from pipelines.run import resolve_config, run_training

    cfg = resolve_config(
        ROOT / "configs" / "tiny.yaml",
        questions=questions or zen["questions"],
        outputs=zen["outputs"],
        overrides=overrides,
    )
    run = Client().get_pipeline_run(run_training(cfg).id)
    zen["runs"][name] = run
    return run


def statuses(run):
    return {n: str(s.status.value) for n, s in run.steps.items()}


def decision(run):
    return run.steps["promote"].outputs["promotion_decision"][0].load()


def production(zen):
    from zenml.client import Client
    from zenml.enums import ModelStages

    return Client().get_model_version("tapper-LaMP_2N", ModelStages.PRODUCTION)


def mlflow_production_version():
    import mlflow

    from zenml.client import Client

    uri = Client().active_stack.experiment_tracker.get_tracking_uri()
    return mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias("tapper-LaMP_2N", "production").version


def test_first_run_completes_and_is_promoted(zen):
    run = train(zen, BAD, "bad")
    assert str(run.status.value) == "completed"
    assert all(v == "completed" for v in statuses(run).values()), statuses(run)
    d = decision(run)
    assert d.promoted and d.production_version is None and d.paired is None  # nothing to pair with
    assert str(production(zen).number) == d.model_version
    # MLflow has the run's parameters, metrics and the registered model with the production alias.
    import mlflow

    reg = run.steps["register_model"].outputs["registration"][0].load()
    r = mlflow.MlflowClient(tracking_uri=reg["tracking_uri"]).get_run(reg["mlflow_run_id"])
    assert r.data.params["stage1.skip"] == "True" and "tap-per/accuracy" in r.data.metrics
    assert str(mlflow_production_version()) == str(reg["mlflow_version"])
    # The data-quality report is an artifact with a dashboard visualization and summary metadata.
    dq = run.steps["validate_data"].outputs["data_quality_report"][0]
    assert dq.run_metadata["verdict"] == "passed" and dq.run_metadata["queries"] == 16
    assert dq.visualizations


def test_better_model_is_promoted(zen):
    run = train(zen, GOOD, "good")
    d = decision(run)
    bad = decision(zen["runs"]["bad"])
    assert d.candidate_score > bad.candidate_score, (d, bad)
    assert d.promoted and d.production_version == bad.model_version and d.production_score == bad.candidate_score
    assert d.archived_version == bad.model_version
    # Both models paired on the same evaluation queries (production's per-query scores from its recorded report).
    report = run.steps["report"].outputs["evaluation_report"][0].load()
    assert d.paired["queries"] == report.eval_queries == 6 and d.paired["mean"] == pytest.approx(
        d.candidate_score - d.production_score
    )
    assert d.paired["ci95"][0] <= d.paired["mean"] <= d.paired["ci95"][1] and "paired on the same queries" in d.reason
    from zenml.client import Client

    assert str(Client().get_model_version("tapper-LaMP_2N", bad.model_version).stage) in (
        "archived",
        "ModelStages.ARCHIVED",
    )
    assert str(production(zen).number) == d.model_version
    reg = run.steps["register_model"].outputs["registration"][0].load()
    assert str(mlflow_production_version()) == str(reg["mlflow_version"])


def test_promotion_exports_and_publishes_a_serving_bundle(zen, tmp_path):
    from deploy.bundle import read_bundle
    from deploy.service import ServeConfig, TapperService

    bad, good = decision(zen["runs"]["bad"]), decision(zen["runs"]["good"])
    root = Path(os.environ["TAPPER_HOME"]) / ".tapper" / "serving" / "tapper-LaMP_2N"
    assert bad.bundle_path == str(root / f"v{bad.model_version}") and Path(bad.bundle_path).is_dir()
    assert good.bundle_path == str(root / f"v{good.model_version}") and good.serving_link == str(root / "current")
    assert (root / "current").resolve() == Path(good.bundle_path).resolve()  # the latest promotion is served
    assert production(zen).run_metadata["promotion"]["bundle_path"] == good.bundle_path
    info = read_bundle(root / "current")
    assert info.version == f"tapper-LaMP_2N/{good.model_version}" and info.task == "LaMP_2N"
    state = zen["runs"]["good"].steps["train_stage2"].outputs["tapper_state"][0].load()
    assert info.backbone_hash == state.backbone_hash and info.histories_file.is_file()
    # deploy's loader serves it: the backbone hash checks out, a Stage-2 user is known and gets an answer.
    svc = TapperService(ServeConfig(model_dir=root / "current", state_dir=tmp_path / "live"))
    ld = svc.load()
    user = sorted(ld.model.user_rows)[0]
    from tapper.data import get_task

    out = svc.predict(user, get_task("LaMP_2N").make_input(text="market team recipe vote school film"))
    assert out["known_user"] and out["model_version"] == info.version and out["history_stored"] > 0
    assert isinstance(out["prediction"], str)


def test_identical_run_is_served_from_cache(zen):
    run = train(zen, GOOD, "good-again")
    s = statuses(run)
    assert str(run.status.value) == "completed"
    assert all(s[n] == "cached" for n in COMPUTE_STEPS), s
    assert s["register_model"] == "completed" and s["promote"] == "completed"  # a new model version each run
    assert not decision(run).promoted  # equal, not better


def test_stage2_change_reuses_data_embeddings_and_stage1(zen):
    run = train(zen, GOOD + ["stage2.epochs=2"], "stage2-change")
    s = statuses(run)
    for n in ["load_data", "validate_data", "build_splits", "cache_embeddings", "train_stage1", "evaluate_base"]:
        assert s[n] == "cached", (n, s)
    assert s["train_stage2"] == "completed" and s["evaluate_tapper"] == "completed"


def test_worse_model_is_not_promoted(zen):
    before = production(zen).number
    # With the stricter gate (a pipeline parameter, `--set promote_if=...`), recorded on the decision.
    run = train(zen, BAD + ["promote_if=significantly-better"], "bad-again")
    d = decision(run)
    assert not d.promoted and "does not beat" in d.reason and d.promote_if == "significantly-better"
    assert d.bundle_path is None  # nothing new to serve
    assert d.production_score is not None and d.production_score > d.candidate_score
    assert d.paired is not None, d.reason
    assert d.paired["mean"] < 0 and d.paired["mean"] == pytest.approx(d.candidate_score - d.production_score)
    assert production(zen).number == before


def test_the_promotion_gate_better_or_significantly_better():
    from tapper.eval.promotion import passes_gate

    clear = {"mean": 0.2, "ci95": [0.05, 0.35]}
    unclear = {"mean": 0.1, "ci95": [-0.05, 0.25]}
    assert passes_gate(0.6, 0.4, True, unclear, "better") == (True, "")
    assert passes_gate(0.6, 0.4, True, clear, "significantly-better") == (True, "")
    ok, why = passes_gate(0.6, 0.4, True, unclear, "significantly-better")
    assert not ok and "includes no change" in why
    ok, why = passes_gate(0.6, 0.4, True, None, "significantly-better")
    assert not ok and "cannot be paired" in why
    assert passes_gate(0.4, 0.4, True, clear, "better") == (False, "does not beat")  # equal is not better
    # Lower is better (MAE): the interval of candidate - production must lie below 0.
    assert passes_gate(0.7, 0.9, False, {"mean": -0.2, "ci95": [-0.3, -0.1]}, "significantly-better") == (True, "")
    assert not passes_gate(0.7, 0.9, False, {"mean": -0.2, "ci95": [-0.3, 0.1]}, "significantly-better")[0]
    with pytest.raises(ValueError, match="promote_if"):
        passes_gate(0.6, 0.4, True, clear, "best")


def test_corrupted_file_stops_before_the_run(zen):
    """A file tapper's loader cannot read (a date that does not parse, a label outside the task's) stops the run
    before it starts, naming the file, the record and the field: no pipeline run, no model version."""
    from zenml.client import Client

    from pipelines.run import RunSetupError

    data = json.loads(Path(zen["questions"]).read_text())
    data[0]["profile"][1]["category"] = "not-a-category"
    data[1]["profile"][0]["date"] = "2020-13-45"
    bad = zen["tmp"] / "corrupt" / "questions.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(data))
    prod_before = production(zen).number
    runs_before = Client().list_pipeline_runs(size=1).total
    versions_before = Client().list_model_versions(model="tapper-LaMP_2N", size=1).total
    with pytest.raises(
        RunSetupError, match=r"corrupt/questions.json, record '\w+', field '(date|category)': .*; fix the file"
    ):
        train(zen, GOOD, "corrupt", questions=str(bad))
    assert Client().list_pipeline_runs(size=1).total == runs_before
    assert Client().list_model_versions(model="tapper-LaMP_2N", size=1).total == versions_before
    assert production(zen).number == prod_before


def test_schedule_refused_on_local_stack(zen):
    from pipelines.run import RunSetupError, resolve_config, run_training

    cfg = resolve_config(ROOT / "configs" / "tiny.yaml", questions=zen["questions"], outputs=zen["outputs"])
    cfg["schedule"] = {"cron_expression": "0 3 * * 1"}
    with pytest.raises(RunSetupError, match="local runs cannot be scheduled"):
        run_training(cfg)
    with pytest.raises(
        RunSetupError, match=r"promote_if must be one of \['better', 'significantly-better'\], got 'best'"
    ):
        resolve_config(
            ROOT / "configs" / "tiny.yaml",
            questions=zen["questions"],
            outputs=zen["outputs"],
            overrides=["promote_if=best"],
        )


def test_a_wiped_local_artifact_store_gets_a_new_component(zen, tmp_path, monkeypatch):
    """A checkout deleted and cloned again at the same path must not reuse cached steps whose artifacts
    went with it: the step cache is keyed by the artifact store component, so that component must change."""
    from zenml.client import Client
    from zenml.enums import StackComponentType as T

    from pipelines.stacks import STORE_ID_FILE, stack_up

    client = Client()
    previous = client.active_stack_model.name
    home = os.environ["TAPPER_HOME"]
    monkeypatch.setenv("TAPPER_HOME", str(tmp_path / "checkout"))
    store = tmp_path / "checkout" / ".tapper" / "artifacts"

    def artifact_store():
        return client.active_stack_model.components[T.ARTIFACT_STORE][0]

    try:
        stack_up("local")
        first = artifact_store()
        assert (store / STORE_ID_FILE).is_file() and first.configuration["path"] == str(store)
        stack_up("local")
        assert artifact_store().id == first.id  # the same checkout keeps its component (and its cache)
        shutil.rmtree(tmp_path / "checkout")
        stack_up("local")
        assert artifact_store().id != first.id and artifact_store().configuration["path"] == str(store)
    finally:
        # stack_up re-points tapper-local's components (MLflow too): point them back at this module's project.
        monkeypatch.setenv("TAPPER_HOME", home)
        stack_up("local")
        client.activate_stack(previous)


def test_k8s_stack_registers_with_its_flavors(zen, monkeypatch):
    """`tapper stack up k8s` registers real components of the production flavors (no cluster is contacted)."""
    from zenml.client import Client
    from zenml.enums import StackComponentType as T

    from pipelines.stacks import StackConfigError, stack_up

    client = Client()
    previous = client.active_stack_model.name
    with pytest.raises(StackConfigError, match="TAPPER_K8S_CONTEXT"):
        stack_up("k8s")
    for key, value in {
        "TAPPER_K8S_CONTEXT": "prod-cluster",
        "TAPPER_REGISTRY": "registry.example.com/tapper",
        "TAPPER_S3_BUCKET": "tapper-artifacts",
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com",
        "MLFLOW_TRACKING_TOKEN": "token",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        assert "registered and active" in stack_up("k8s")
        stack = client.active_stack_model
        assert stack.name == "tapper-k8s"
        flavors = {t: stack.components[t][0].flavor_name for t in stack.components}
        assert flavors == {
            T.ORCHESTRATOR: "kubernetes",
            T.ARTIFACT_STORE: "s3",
            T.CONTAINER_REGISTRY: "default",
            T.IMAGE_BUILDER: "kaniko",
            T.EXPERIMENT_TRACKER: "mlflow",
            T.MODEL_REGISTRY: "mlflow",
        }
        orchestrator = stack.components[T.ORCHESTRATOR][0].configuration
        assert orchestrator["kubernetes_context"] == "prod-cluster" and orchestrator["kubernetes_namespace"] == "tapper"
        assert stack.components[T.ARTIFACT_STORE][0].configuration["path"] == "s3://tapper-artifacts/zenml"
    finally:
        client.activate_stack(previous)
    assert client.active_stack_model.name == previous


def test_cli_lineage_and_forced_promotion(zen, capsys):
    from tapper.cli import main

    bad_version = decision(zen["runs"]["bad"]).model_version
    assert main(["lineage", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stage"] == "production" and info["data_quality"]["verdict"] == "passed"
    assert [s["step"] for s in info["steps"]][:5] == [
        "load_data",
        "validate_data",
        "build_splits",
        "cache_embeddings",
        "train_stage1",
    ]
    assert info["inputs"]["questions"] == zen["questions"]
    assert main(["promote", bad_version]) == 0
    assert "forced" in capsys.readouterr().out
    assert str(production(zen).number) == bad_version
    assert production(zen).run_metadata["promotion_forced"]["forced"] is True
    link = Path(os.environ["TAPPER_HOME"]) / ".tapper" / "serving" / "tapper-LaMP_2N" / "current"
    assert link.resolve().name == f"v{bad_version}"  # a forced promotion is published for serving too
    assert main(["lineage", bad_version]) == 0
    assert "forced promotion" in capsys.readouterr().out
