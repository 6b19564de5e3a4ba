"""The CLI a new user meets, on real ZenML/MLflow stores in a temporary directory: `--help` without heavy imports,
one-line errors that name the file or field (a traceback only with --debug), input files checked before a run,
a run that fails validation leaving no model version, the training summary, `tapper models`, and `tapper ui`
whose `--stop` leaves the other commands working (a CLI left logged in to a stopped server is mended).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from workflow_data import isolated_workflow, reset_zenml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
HEAVY = ("torch", "transformers", "peft", "zenml", "mlflow", "great_expectations", "pandas")


def cli(args, capfd):
    """Run `tapper ARGS` in this process; (exit code, stdout, stderr) as the terminal saw them."""
    from tapper.cli import main

    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The CLI's error: exactly one `tapper: error:` line, and no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("tapper: error:")]
    assert len(lines) == 1, err
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        f"import sys, tapper.cli; tapper.cli.build_parser(); print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "", f"building the parser imported {out.strip()}"
    exe = Path(sys.executable).with_name("tapper")
    best = min(_timed([str(exe), "--help"]) for _ in range(3))
    assert best < 1.0, f"tapper --help took {best:.2f} s"


def _timed(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def zen(tmp_path_factory):
    yield from isolated_workflow(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def trained(zen):
    """One `tapper train` on the tiny backbone; its output is what the tests read."""
    from tapper.cli import main

    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["train", "--config", TINY, "--questions", zen["questions"], "--outputs", zen["outputs"]])
    zen["train_output"] = buf.getvalue()
    assert code == 0, zen["train_output"]
    return zen


def test_train_summary_has_paired_intervals_and_the_next_commands(trained):
    out = trained["train_output"]
    assert "paired on the same queries" in out and "tap-per - base: " in out and "over 6 queries" in out
    assert "labels alone (accuracy): always " in out and "each user's most frequent past label" in out
    assert "PROMOTED" in out and "pipeline time:" in out
    nxt = out[out.index("next:") :]
    for command in ("models", "lineage", "ui"):
        assert f"tapper {command}" in nxt, nxt


def test_the_mlflow_run_covers_the_pipeline_and_the_model_version_is_described(trained):
    import mlflow
    from zenml.client import Client

    run = Client().get_pipeline_run(Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0].id)
    reg = run.steps["register_model"].outputs["registration"][0].load()
    client = mlflow.MlflowClient(tracking_uri=reg["tracking_uri"])
    mr = client.get_run(reg["mlflow_run_id"])
    # Opened by the first step, closed by the last: it lasts as long as the pipeline, not one step.
    first, last = run.steps["load_data"], run.steps["promote"]
    assert mr.info.start_time / 1000 <= first.end_time.timestamp() + 1
    assert mr.info.end_time / 1000 >= last.start_time.timestamp() - 1
    assert (
        "loss/stage1" in mr.data.metrics
        and "base/accuracy" in mr.data.metrics
        and "reference/most_popular_label" in mr.data.metrics
    )
    mv = client.get_model_version(reg["mlflow_model"], reg["mlflow_version"])
    assert "| variant | accuracy | f1 | accuracy - base | 95% interval | queries |" in mv.description
    mlflow.set_tracking_uri(reg["tracking_uri"])
    try:
        info = mlflow.models.get_model_info(mv.source)
    finally:
        mlflow.set_tracking_uri("")
    assert info.signature is not None and [c.name for c in info.signature.inputs.inputs][:2] == ["id", "input"]
    assert "evaluation/variants.json" in [a.path for a in client.list_artifacts(mr.info.run_id, "evaluation")]


def test_stack_show_says_where_the_data_is(trained, capfd):
    code, out, _ = cli(["stack", "show"], capfd)
    info = json.loads(out)
    project = Path(os.environ["TAPPER_HOME"])
    assert code == 0 and info["name"] == "tapper-local"
    assert info["components"]["artifact_store"]["path"] == str(project / ".tapper" / "artifacts")
    assert info["components"]["experiment_tracker"]["tracking_uri"] == f"sqlite:///{project}/.tapper/mlflow/mlflow.db"


def test_models_lists_versions_stages_metric_and_promotion(trained, capfd):
    code, out, _ = cli(["models", "--json"], capfd)
    assert code == 0
    info = json.loads(out)
    assert info["model"] == "tapper-LaMP_2N"
    v = info["versions"][0]
    assert v["stage"] == "production" and v["metric"] == "accuracy" and isinstance(v["score"], float)
    assert v["decision"] == "promoted" and v["decided_at"] and v["mlflow_version"] == "1"
    assert "production" in v["mlflow_aliases"]
    code, out, _ = cli(["models"], capfd)
    assert code == 0 and "production" in out and "promoted" in out


@pytest.mark.parametrize(
    "case",
    [
        "lineage-99",
        "promote-99",
        "models-unknown",
        "not-json",
        "missing-file",
        "missing-config",
        "bad-set",
        "unknown-task",
        "build-missing-source",
    ],
)
def test_every_error_is_one_line_naming_what_to_fix(trained, capfd, tmp_path, case):
    from zenml.client import Client

    q, o = trained["questions"], trained["outputs"]
    not_json = tmp_path / "questions.json"
    not_json.write_text("this is not JSON\n")
    args, expected = {
        "lineage-99": (["lineage", "99"], "model tapper-LaMP_2N has no version '99' (versions: "),
        "promote-99": (["promote", "99"], "model tapper-LaMP_2N has no version '99'"),
        "models-unknown": (["models", "tapper-nosuch"], "no model named 'tapper-nosuch'; models: tapper-LaMP_2N"),
        "not-json": (
            ["train", "--config", TINY, "--questions", not_json, "--outputs", o],
            f"{not_json}: not valid JSON: Expecting value: line 1 column 1 (char 0); fix the file and run again",
        ),
        "missing-file": (
            ["train", "--config", TINY, "--questions", tmp_path / "nope.json", "--outputs", o],
            f"questions file not found: {tmp_path / 'nope.json'}",
        ),
        "missing-config": (
            ["train", "--config", tmp_path / "nope.yaml", "--questions", q, "--outputs", o],
            f"config file not found: {tmp_path / 'nope.yaml'}",
        ),
        "bad-set": (
            ["train", "--config", TINY, "--questions", q, "--outputs", o, "--set", "stage9.lr=1"],
            "--set 'stage9.lr=1': unknown key 'stage9'",
        ),
        "unknown-task": (
            ["train", "--config", TINY, "--questions", q, "--outputs", o, "--task", "LaMP_9"],
            "task: unknown LaMP task 'LaMP_9'",
        ),
        "build-missing-source": (
            ["build", "news", "--source", tmp_path / "none", "--out", tmp_path / "out"],
            f"no News Category data at {tmp_path / 'none'}; pass --source",
        ),
    }[case]
    runs_before = Client().list_pipeline_runs(size=1).total
    t0 = time.monotonic()
    code, out, err = cli(args, capfd)
    line = error_line(err)
    assert code == 2 and expected in line, (line, expected)
    if args[0] == "train":  # checked before any pipeline run started
        assert Client().list_pipeline_runs(size=1).total == runs_before and time.monotonic() - t0 < 30


def test_debug_shows_the_traceback(trained):
    """With --debug the error propagates (Python prints the traceback) instead of becoming one line."""
    from tapper.cli import CLIError, main

    with pytest.raises(CLIError, match="has no version '99'"):
        main(["lineage", "99", "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "build", "news", "--source", "/nonexistent/news", "--out", "/tmp/unused"])


def test_a_run_that_fails_validation_creates_no_model_version(trained, capfd):
    """Files that parse but fail the data-quality suite (histories shorter than `min_history`) stop the run at
    validate_data: nothing downstream runs, no model version is created, and the CLI says what failed, in words."""
    from zenml.client import Client

    versions = Client().list_model_versions(model="tapper-LaMP_2N", size=1).total
    code, out, err = cli(
        [
            "train",
            "--config",
            TINY,
            "--questions",
            trained["questions"],
            "--outputs",
            trained["outputs"],
            "--set",
            "min_history=50",
        ],
        capfd,
    )
    line = error_line(err)
    assert code == 1 and "questions.json / outputs.json failed data validation (1 problem(s) listed above" in line
    assert "no model version was created" in line
    assert (
        "  - questions.json: 16 question(s) have a history (profile) of fewer than 50 or more than 100000 records"
        in err
    )
    run = Client().get_pipeline_run(Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0].id)
    assert str(run.status.value) == "failed" and str(run.steps["validate_data"].status.value) == "failed"
    assert set(run.steps) == {"load_data", "validate_data"}
    assert Client().list_model_versions(model="tapper-LaMP_2N", size=1).total == versions
    report = Client().get_artifact_version("data_quality_report")
    assert report.run_metadata["verdict"] == "failed" and report.run_metadata["failed_expectations"] == 1


def test_ui_stop_leaves_lineage_working(trained, capfd):
    from zenml.config.global_config import GlobalConfiguration
    from zenml.enums import StoreType

    dash, ml = free_port(), free_port()
    try:
        code, out, err = cli(["ui", "--port", dash, "--mlflow-port", ml], capfd)
        assert code == 0, err
        assert (
            f"ZenML dashboard: http://127.0.0.1:{dash}" in out
            and f"MLflow UI: http://127.0.0.1:{ml}/#/experiments/" in out
        )
        assert "tapper ui --stop" in out and "/runs/" in out
        for port in (dash, ml):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                assert r.status == 200
        # The dashboard serves the runs the CLI wrote, and the CLI still writes to its own store.
        with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/v1/runs?size=1", timeout=10) as r:
            assert json.loads(r.read())["total"] >= 1
        assert GlobalConfiguration().store_configuration.type == StoreType.SQL
    finally:
        code, out, _ = cli(["ui", "--stop"], capfd)
    assert code == 0 and "ZenML dashboard" in out and "MLflow UI" in out
    assert not listening(dash) and not listening(ml)
    t0 = time.monotonic()
    code, out, err = cli(["lineage"], capfd)
    assert code == 0 and "pipeline run" in out and time.monotonic() - t0 < 30, err
    code, out, _ = cli(["ui", "--stop"], capfd)
    assert "nothing to stop" in out


def test_a_cli_left_logged_in_to_a_stopped_server_is_mended(trained, capfd):
    """What `zenml login --local` (and the old `tapper dashboard`) left behind once the server stopped: the
    CLI's store is a REST URL nobody answers. The next tapper command points it back at the local store."""
    import yaml
    from zenml.config.global_config import GlobalConfiguration
    from zenml.enums import StoreType

    path = Path(os.environ["ZENML_CONFIG_PATH"]) / "config.yaml"
    before = path.read_text()
    config = yaml.safe_load(before)
    dead = f"http://127.0.0.1:{free_port()}"
    config["store"] = {"type": "rest", "url": dead}
    path.write_text(yaml.safe_dump(config))
    reset_zenml()
    try:
        t0 = time.monotonic()
        code, out, err = cli(["lineage"], capfd)
        assert code == 0 and time.monotonic() - t0 < 30, err
        assert f"the ZenML CLI was logged in to a local server at {dead} that is not running" in err
        assert GlobalConfiguration().store_configuration.type == StoreType.SQL
    finally:
        if GlobalConfiguration().store_configuration.type != StoreType.SQL:
            path.write_text(before)
        reset_zenml()


@pytest.mark.slow
def test_screenshots_of_the_dag_the_data_quality_report_and_mlflow(trained, capfd, tmp_path):
    pytest.importorskip("PIL", reason="Pillow reads the screenshots")
    from pipelines.screenshots import chromium
    from pipelines.ui import UIError

    try:
        chromium()
    except UIError:
        pytest.skip("no Chromium on this machine")
    out_dir = Path(os.environ.get("TAPPER_SCREENSHOTS") or tmp_path)
    try:
        code, out, err = cli(
            ["ui", "--port", free_port(), "--mlflow-port", free_port(), "--screenshots", out_dir], capfd
        )
    finally:
        cli(["ui", "--stop"], capfd)
    assert code == 0, err
    from PIL import Image

    for name in ("dashboard-run-dag", "data-quality-report", "mlflow-run", "mlflow-model-version"):
        png = out_dir / f"{name}.png"
        assert png.is_file(), out
        colors = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 50, f"{png} is nearly blank"
