"""Batch scoring through the MLflow registry: `mlflow.pyfunc.load_model("models:/<name>@production").predict(df)`
on a real (SQLite) registry, a DataFrame of user_id, input[, date] rows, answered exactly as `tapper serve`
answers the same requests (the same Predictor), with the users' stored histories logged with the model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from deploy.bundle import bundle_from_mlflow_dir, export_bundle
from deploy.histories import write_histories
from deploy.service import TapperService
from serving_helpers import build_trained, serve_config

MODEL_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "mlflow_model.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_trained(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def registered(trained, tmp_path_factory):
    """The pyfunc model logged and registered the way steps/register.py does, alias `production`, in a SQLite
    registry with its artifacts in a temporary directory."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    ref = root / "backbone.json"
    ref.write_text(json.dumps({"task": "LaMP_2N", "uri": str(trained["stage1"]), "spec": "tiny", "weights_hash": ""}))
    histories = write_histories(root / "histories.jsonl", trained["histories"])
    artifacts = {
        "tapper_state": str(trained["state"]),
        "backbone_ref": str(ref),
        "stage1_backbone": str(trained["stage1"]),
        "histories": str(histories),
    }
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("batch-scoring", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="tapper",
                python_model=str(MODEL_FILE),
                artifacts=artifacts,
                registered_model_name="tapper-batch",
                pip_requirements=["tapper"],
                metadata={"task": "LaMP_2N", "zenml_model_version": "3"},
            )
        client.set_registered_model_alias("tapper-batch", "production", info.registered_model_version)
        model = mlflow.pyfunc.load_model("models:/tapper-batch@production")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri="models:/tapper-batch@production", dst_path=str(root / "dl")
        )
        yield {"model": model, "local": Path(local)}
    finally:
        mlflow.set_tracking_uri(previous)


def test_the_production_model_scores_a_dataframe_as_the_server_answers(registered, trained, tmp_path):
    users, evals = trained["users"], trained["evals"]
    df = pd.DataFrame(
        {
            "user_id": [users[0], users[1], users[2], "stranger", users[3]],
            "input": [evals[0].input, evals[1].input, evals[0].input, evals[2].input, evals[3].input],
            "date": ["2021-03-01", None, "2021", pd.NaT, pd.Timestamp("2021-04-01")],
        },
        index=[10, 11, 12, 13, 14],
    )
    preds = registered["model"].predict(df)
    assert list(preds.index) == [10, 11, 12, 13, 14] and preds.name == "prediction"

    bundle = export_bundle(
        trained["stage1"], trained["state"], "LaMP_2N", tmp_path / "bundle", version="v", histories=trained["histories"]
    )
    svc = TapperService(serve_config(model_dir=bundle.path, state_dir=tmp_path / "live"))
    svc.load()
    from tapper.data.chronology import parse_lamp_date

    # The loaded pyfunc's own scorer: the rows' full answers (which user row, how many stored records were read)
    # equal the server's, so the registry's model uses the users' histories and rows as the server does.
    scorer = registered["model"].unwrap_python_model().scorer
    answers = scorer.predictor.run(scorer.jobs(df))
    keys = ("prediction", "known_user", "user_row", "history_used", "history_stored")
    for (_, row), got, full in zip(df.iterrows(), preds, answers):
        date = (
            None
            if pd.isna(row["date"])
            else (row["date"].date() if isinstance(row["date"], pd.Timestamp) else parse_lamp_date(row["date"]))
        )
        served = svc.predict(row["user_id"], row["input"], query_date=date)
        assert got == served["prediction"] and {k: full[k] for k in keys} == {k: served[k] for k in keys}
    assert [a["history_stored"] for a in answers] == [len(trained["histories"][u]) for u in users[:3]] + [
        0,
        len(trained["histories"][users[3]]),
    ]
    svc.close()

    with pytest.raises(ValueError, match=r"missing \['input'\]"):
        registered["model"].predict(pd.DataFrame({"user_id": ["u"]}))
    with pytest.raises(ValueError, match="row 0, column 'date'"):
        registered["model"].predict(pd.DataFrame({"user_id": ["u"], "input": ["x"], "date": ["yesterday"]}))


def test_a_bundle_from_the_registered_model_carries_its_histories(registered, trained, tmp_path):
    info = bundle_from_mlflow_dir(registered["local"], tmp_path / "bundle")
    assert info.version == "3" and info.histories_file.is_file()
    svc = TapperService(serve_config(model_dir=info.path, state_dir=tmp_path / "live"))
    ld = svc.load()
    assert {u: [r.id for r in h] for u, h in ld.histories.items()} == {
        u: [r.id for r in h] for u, h in trained["histories"].items()
    }
    svc.close()
