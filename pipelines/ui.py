"""`tapper ui`: the ZenML dashboard and the MLflow UI on this machine's stores, and `tapper ui --stop`.

The ZenML dashboard is ZenML's local server daemon, started *without* logging the CLI in to it
(`zenml login --local` does log in: once that server stops, every ZenML command retries a dead URL
for about 40 s and fails). The server reads the same local store the CLI writes, so runs appear in
it as they happen, and stopping it changes nothing for the CLI.

The MLflow UI is `mlflow server` on the active stack's tracking store (the local stack's SQLite
database and artifact directory), in its own process group, recorded in `.tapper/ui.json` so that
`--stop` ends exactly what was started.

`tapper ui` also answers the dashboard's first-visit sign-up form for the local user (no email, no
newsletter), which would otherwise stand in front of every page.

Both are also what `mend_client` checks: a CLI left logged in to a local server that is no longer
running (by `zenml login --local`, or an older `tapper dashboard`) is pointed back at the local store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DASHBOARD_PORT = 8237  # ZenML's default
MLFLOW_PORT = 5000  # MLflow's default
HOST = "127.0.0.1"


class UIError(RuntimeError):
    pass


def state_file() -> Path:
    from pipelines.stacks import project_root

    return project_root() / ".tapper" / "ui.json"


def _read_state() -> dict[str, Any]:
    try:
        return json.loads(state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(state: dict[str, Any]) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    if state:
        path.write_text(json.dumps(state, indent=1) + "\n")
    else:
        path.unlink(missing_ok=True)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def chosen_port(port: int | None, default: int, flag: str) -> int:
    """The port asked for (which must be free), else `default` or the next free one above it."""
    if port is None:
        return free_port(default)
    if not port_free(port):
        raise UIError(f"port {port} is in use; pass another {flag}, or leave {flag} out to take a free one")
    return port


def free_port(start: int, host: str = HOST, tries: int = 50) -> int:
    """`start` if nothing listens there, else the next port up that is free."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    raise UIError(f"no free port in {start}..{start + tries - 1}; pass another with --port / --mlflow-port")


def _wait_http(url: str, timeout: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return True
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    return False


# --- the CLI's store --------------------------------------------------------------------------


def mend_client() -> str | None:
    """If the ZenML CLI is logged in to a local server that does not answer, point it back at the local
    store (what `zenml logout` would do) and say so; returns the message, or None when nothing was wrong."""
    from zenml.config.global_config import GlobalConfiguration
    from zenml.enums import StoreType

    gc = GlobalConfiguration()
    store = gc.store_configuration
    if store.type != StoreType.REST:
        return None
    parsed = urlparse(store.url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None  # a remote server: its availability is not ours to judge
    if port_open(parsed.hostname, parsed.port or 80):
        return None
    gc.set_default_store()
    return (
        f"note: the ZenML CLI was logged in to a local server at {store.url} that is not running; "
        "it now uses the local store again (as `zenml logout` would)"
    )


# --- ZenML dashboard --------------------------------------------------------------------------


def _deployer():
    from zenml.zen_server.deploy.deployer import LocalServerDeployer

    return LocalServerDeployer()


def dashboard_url() -> str | None:
    """The URL of the local ZenML server if one is running, else None."""
    from zenml.zen_server.deploy.exceptions import ServerDeploymentNotFoundError

    try:
        server = _deployer().get_server()
    except ServerDeploymentNotFoundError:
        return None
    url = server.status.url if server.status else None
    if url and port_open(urlparse(url).hostname or HOST, urlparse(url).port or 80):
        return url
    return None


def skip_first_visit_survey() -> None:
    """The dashboard greets a user it has not seen with a sign-up form (name, email, newsletter), in front of
    every page. For this machine's local user of the local dashboard, `tapper ui` answers it once: no email,
    no newsletter. (The dashboard's settings page changes that.)"""
    from zenml.client import Client

    client = Client()
    user = client.active_user
    meta = dict((user.metadata.user_metadata if user.metadata else None) or {})
    if user.body.email_opted_in is None or not meta.get("finished_onboarding_survey"):
        client.update_user(
            user.id,
            updated_email_opt_in=bool(user.body.email_opted_in),
            updated_metadata={**meta, "finished_onboarding_survey": True},
        )


def start_dashboard(port: int | None = None, timeout: float = 90) -> str:
    from zenml.enums import ServerProviderType
    from zenml.zen_server.deploy.deployment import LocalServerDeploymentConfig

    skip_first_visit_survey()
    url = dashboard_url()
    if url:
        return url
    port = chosen_port(port, DASHBOARD_PORT, "--port")
    config = LocalServerDeploymentConfig(provider=ServerProviderType.DAEMON, port=port, ip_address=HOST)
    server = _deployer().deploy_server(config, timeout=int(timeout))
    url = server.status.url if server.status and server.status.url else f"http://{HOST}:{port}"
    if not _wait_http(f"{url}/health", timeout):
        raise UIError(
            f"the ZenML dashboard did not answer at {url} within {timeout:.0f} s; see `zenml logs` "
            "or run `tapper ui --stop` and try again"
        )
    return url


def stop_dashboard() -> bool:
    deployer = _deployer()
    from zenml.zen_server.deploy.exceptions import ServerDeploymentNotFoundError

    try:
        deployer.get_server()
    except ServerDeploymentNotFoundError:
        return False
    deployer.remove_server()  # also logs the CLI out of it, if something had logged it in
    return True


# --- MLflow UI --------------------------------------------------------------------------------


def tracking_store() -> tuple[str, str | None]:
    """(tracking URI, artifact root or None) of the active stack's MLflow experiment tracker."""
    from zenml.client import Client

    tracker = Client().active_stack.experiment_tracker
    if tracker is None or tracker.flavor != "mlflow":
        raise UIError("the active stack has no MLflow experiment tracker; run `tapper stack up local`")
    uri = tracker.get_tracking_uri()
    artifacts = None
    if uri.startswith("sqlite:///"):
        from pipelines.stacks import ensure_mlflow_local, resolve

        spec = resolve("local")
        if spec["components"]["experiment_tracker"]["config"]["tracking_uri"] == uri:
            artifacts = spec.get("mlflow_artifacts")
            ensure_mlflow_local(spec)  # the training experiment exists, in MLflow's model-training layout
    return uri, artifacts


def training_experiment(uri: str, name: str = "training") -> tuple[str | None, str | None]:
    """(experiment id, latest run id) of the training pipeline's MLflow experiment, if it exists."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None, None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return exp.experiment_id, (runs[0].info.run_id if runs else None)


def start_mlflow(port: int | None = None, timeout: float = 90) -> dict[str, Any]:
    state = _read_state().get("mlflow")
    if state and _alive(state["pid"]) and port_open(HOST, state["port"]):
        return state
    uri, artifacts = tracking_store()
    if not uri.startswith("sqlite:///"):
        raise UIError(
            f"MLflow tracks to {uri}, a server of its own: open it there (tapper ui starts a UI only "
            "for the local stack's store)"
        )
    port = chosen_port(port, MLFLOW_PORT, "--mlflow-port")
    log = state_file().parent / "mlflow-ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifacts:
        cmd += ["--default-artifact-root", Path(artifacts).as_uri()]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )  # its own process group: --stop ends it and its workers
    state = {"pid": proc.pid, "port": port, "url": f"http://{HOST}:{port}", "tracking_uri": uri, "log": str(log)}
    _write_state({**_read_state(), "mlflow": state})
    if not _wait_http(f"{state['url']}/health", timeout):
        stop_mlflow()
        raise UIError(f"the MLflow UI did not start within {timeout:.0f} s; its log: {log}")
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_mlflow(timeout: float = 15) -> bool:
    all_state = _read_state()
    state = all_state.pop("mlflow", None)
    _write_state(all_state)
    if not state or not _alive(state["pid"]):
        return False
    pgid = state["pid"]  # started with start_new_session: the group id is its pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(state["pid"]):
        time.sleep(0.2)
        try:
            os.waitpid(state["pid"], os.WNOHANG)  # reap it when this process started it
        except ChildProcessError:
            pass
    if _alive(state["pid"]):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def mlflow_links(url: str, uri: str) -> dict[str, str]:
    """Links into the MLflow UI: the training experiment and its latest run (the MLflow home page is GenAI-first)."""
    import mlflow

    exp_id, run_id = training_experiment(uri)
    links = {"mlflow": url}
    ml = "?workflowType=machine_learning"  # the UI's model-training layout (a fresh browser opens its GenAI one)
    if exp_id is not None:
        links["mlflow_experiment"] = f"{url}/#/experiments/{exp_id}/runs{ml}"
        if run_id:
            links["mlflow_run"] = f"{url}/#/experiments/{exp_id}/runs/{run_id}{ml}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    versions = [
        v
        for m in client.search_registered_models()
        if m.name.startswith("tapper")
        for v in client.search_model_versions(f"name = '{m.name}'")
    ]
    if versions:
        latest = max(versions, key=lambda v: v.creation_timestamp)
        links["mlflow_model_version"] = f"{url}/#/models/{latest.name}/versions/{latest.version}{ml}"
    return links


def dashboard_links(url: str) -> dict[str, str]:
    from zenml.client import Client

    links = {"dashboard": url}
    runs = Client().list_pipeline_runs(sort_by="desc:created", size=1)
    if runs.items:
        run = runs.items[0]
        links["dashboard_run"] = f"{url}/projects/{run.project.name}/runs/{run.id}"
    return links
