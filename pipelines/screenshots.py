"""Screenshots of what `tapper ui` serves, with headless Chromium: `tapper ui --screenshots DIR`.

    dashboard-run-dag.png       the latest training run's DAG in the ZenML dashboard
    data-quality-report.png     that run's data-quality report (the HTML the dashboard shows for the artifact)
    mlflow-run.png              the run in the MLflow UI (parameters, metrics, artifacts)
    mlflow-model-version.png    the registered model version (description with the evaluation table, signature)

Chromium runs headless with a fresh profile and nothing that calls home (Debian: `apt-get install chromium`),
driven over its DevTools protocol so that each shot waits until the page has drawn what it is for.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from pipelines.ui import UIError

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise UIError(
        "headless Chromium not found: install it (Debian/Ubuntu: apt-get install chromium) to take screenshots"
    )


class Browser:
    """One headless Chromium driven over the DevTools protocol (websocket-client, which kubernetes already
    brings): it waits, in real time, until a page says it is drawn. The dashboard lays out its DAG in a web
    worker, which Chromium's `--virtual-time-budget` does not wait for."""

    def __init__(self, width: int = 1440, height: int = 1000):
        import re
        import time

        self.profile = tempfile.TemporaryDirectory(prefix="tapper-chromium-")
        cmd = [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self.profile.name}",
            "--remote-debugging-port=0",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline, ws_url = time.monotonic() + 60, None
        while time.monotonic() < deadline and ws_url is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws_url = m.group(1)
        if ws_url is None:
            self.close()
            raise UIError("headless Chromium did not start (no DevTools address on its stderr)")
        import json
        import urllib.request

        host = ws_url.split("/devtools/")[0].replace("ws://", "http://")
        with urllib.request.urlopen(f"{host}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t.get("type") == "page")
        import websocket

        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.enable")

    def call(self, method: str, **params):
        import json

        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise UIError(f"Chromium: {method}: {msg['error'].get('message')}")
                return msg.get("result", {})

    def shot(
        self,
        url: str,
        out: Path,
        ready: str = "true",
        settle: float = 1.5,
        timeout: float = 60,
        height: int | None = None,
        then: str | None = None,
    ) -> Path:
        """Open `url`, wait until the JS expression `ready` is true, run the JS `then` (e.g. close a side panel),
        wait `settle` seconds more, save a PNG."""
        import base64
        import time

        if height:
            self.call(
                "Emulation.setDeviceMetricsOverride", width=1440, height=height, deviceScaleFactor=1, mobile=False
            )
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        check = f"document.readyState === 'complete' && !!({ready})"
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if self.call("Runtime.evaluate", expression=check, returnByValue=True)["result"].get("value"):
                    break
            except UIError:
                continue  # the page is still being replaced
        if then:
            self.call("Runtime.evaluate", expression=then)
        time.sleep(settle)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out = Path(out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        import os
        import signal

        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own process group: the browser and its helpers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.profile.cleanup()


# When each page has drawn what the screenshot is for.
DAG_READY = (
    "document.querySelectorAll('.react-flow__node').length > 0 && !document.body.innerText.includes('Calculating DAG')"
)
MLFLOW_RUN_READY = "document.body.innerText.includes('Metrics') && document.body.innerText.includes('Parameters')"
MLFLOW_MODEL_READY = "document.body.innerText.includes('Description') && document.body.innerText.includes('Schema')"
# MLflow 3.17 opens its (beta) assistant chat beside every page; it hides half of what the shot is for.
MLFLOW_CLOSE_ASSISTANT = "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()"
# Unfold the signature's inputs on the model version page.
MLFLOW_OPEN_SCHEMA = (
    MLFLOW_CLOSE_ASSISTANT + "; [...document.querySelectorAll('*')]"
    ".filter(e => /^Inputs \\(\\d+\\)$/.test((e.innerText || '').trim()) && e.children.length === 0)"
    ".forEach(e => (e.closest('[role=button], button, tr, [class*=row]') || e).click())"
)


def take_screenshots(out_dir: Path, dashboard: str | None, mlflow: dict | None) -> list[Path]:
    """Screenshots of the latest completed training run in the dashboard (`dashboard`: its URL) and in MLflow
    (`mlflow`: `pipelines.ui.mlflow_links`)."""
    from zenml.client import Client

    out_dir = Path(out_dir)
    shots: list[Path] = []
    runs = Client().list_pipeline_runs(sort_by="desc:created", size=1, pipeline_name="training", status="completed")
    run = runs.items[0] if runs.items else None
    browser = Browser()
    try:
        if dashboard and run is not None:
            shots.append(
                browser.shot(
                    f"{dashboard}/projects/{run.project.name}/runs/{run.id}",
                    out_dir / "dashboard-run-dag.png",
                    ready=DAG_READY,
                    settle=2,
                    height=1300,
                )
            )
        if run is not None:
            report = Client().get_pipeline_run(run.id).steps["validate_data"].outputs.get("data_quality_report")
            if report:
                with tempfile.TemporaryDirectory(prefix="tapper-dq-") as tmp:
                    page = Path(tmp) / "data-quality.html"
                    page.write_text(str(report[0].load()))
                    shots.append(browser.shot(page.as_uri(), out_dir / "data-quality-report.png", height=1600))
        if mlflow and mlflow.get("mlflow_run"):
            shots.append(
                browser.shot(
                    mlflow["mlflow_run"],
                    out_dir / "mlflow-run.png",
                    ready=MLFLOW_RUN_READY,
                    height=1300,
                    settle=2,
                    then=MLFLOW_CLOSE_ASSISTANT,
                )
            )
        if mlflow and mlflow.get("mlflow_model_version"):
            shots.append(
                browser.shot(
                    mlflow["mlflow_model_version"],
                    out_dir / "mlflow-model-version.png",
                    ready=MLFLOW_MODEL_READY,
                    height=1400,
                    settle=2,
                    then=MLFLOW_OPEN_SCHEMA,
                )
            )
    finally:
        browser.close()
    return shots
