"""Shared by the serving tests: the tiny trained model, tokens, a real-HTTP client and an in-process uvicorn."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.service import ServeConfig
from model_fixtures import TASK, corpus, tiny_examples
from tapper.config import Stage1Config, Stage2Config
from tapper.model.backbone import load_backbone, load_backbone_dir
from tapper.model.embedding_cache import EmbeddingCache
from tapper.train.stage1 import train_stage1
from tapper.train.stage2 import train_stage2

API_TOKEN = "test-api-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"
AUTH = {"api_tokens": (API_TOKEN,), "admin_tokens": (ADMIN_TOKEN,)}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def serve_config(**kw) -> ServeConfig:
    """A ServeConfig with the test tokens (a server without tokens does not start)."""
    return ServeConfig(**{"auth": AUTH, **kw})


def wait_for(check, timeout: float = 20.0, what: str = "condition"):
    """Poll `check()` until it returns something truthy (replicas sync in the background within sync_seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} not reached in {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """Real HTTP (urllib) against the test server; sends the API token unless `headers` says otherwise."""

    def __init__(self, base: str, token: str | None = API_TOKEN):
        self.base = base
        self.token = token

    def call(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **auth, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else {}


@contextlib.contextmanager
def running(cfg: ServeConfig, lifespan: str = "on", ready: int = 200):
    """uvicorn on 127.0.0.1:<free port> in a thread of this process (the model modules are already imported).
    lifespan="off": the app's startup (the model load) never runs, and /health answers `ready`=503."""
    import uvicorn

    from deploy.app import create_app

    app = create_app(cfg)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    client = Client(f"http://127.0.0.1:{port}")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if client.call("GET", "/health")[0] == ready:
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        pytest.fail("server did not become healthy in 60 s")
    try:
        yield client, app
    finally:
        srv.should_exit = True
        th.join(timeout=10)


def build_trained(root: Path, n_users: int = 4, n_hist: int = 4) -> dict:
    """A tiny Stage-1 backbone dir + Stage-2 state dir + the users' histories (seconds)."""
    train, evals, users = tiny_examples(n_users=n_users, n_hist=n_hist)
    bb = load_backbone("tiny", texts=corpus(train, evals))
    s1 = train_stage1(
        load_backbone_dir(bb.path), TASK, train, Stage1Config(epochs=1, batch_size=16), root / "stage1", progress=False
    )
    s1bb = load_backbone_dir(s1.path)
    cache = EmbeddingCache(root / "cache", s1bb.model, s1bb.tokenizer)
    res = train_stage2(
        s1bb.model,
        s1bb.tokenizer,
        TASK,
        train,
        users,
        Stage2Config(epochs=1, batch_size=16, lr=1e-2),
        cache,
        backbone_hash=s1.weights_hash,
        progress=False,
    )
    res.model.save(root / "state")
    histories = {e.user_id: e.history for e in evals}
    return {"stage1": s1.path, "state": root / "state", "users": users, "histories": histories, "evals": evals}


def record(rid: str, date: str, category: str = "politics") -> dict:
    """A LaMP_2N record as JSON (feedback / history items)."""
    return {"id": rid, "date": date, "text": f"story {rid}", "title": f"title {rid}", "category": category}


def svc_record(rid: str, date: str, category: str = "travel"):
    """A LaMP_2N Record (for TapperService calls without HTTP)."""
    from tapper.data.chronology import parse_lamp_date
    from tapper.data.types import Record

    return Record(
        id=rid,
        fields={"text": f"t {rid}", "title": f"ti {rid}", "category": category},
        date=parse_lamp_date(date),
        raw_date=date,
    )
