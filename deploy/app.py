"""FastAPI application serving a TAP-PER model bundle.

    GET  /health     200 {"status": "ok", ...} once the model is loaded (503 otherwise)
    GET  /info       task, model version, backbone hash, per-user / shared parameters, users, live generation
    POST /predict    {"user_id", "input" | "fields", "date"?, "history"?: [records], "id"?, "max_new_tokens"?}
    POST /feedback   {"user_id", "records": [records with their answers]} -> history store + Online-Emb update
    POST /reload     re-read the bundle (and its newest live generation) from the model dir; swap when loaded
    GET  /metrics    Prometheus metrics (text exposition format): requests, latencies, feedback, model and memory
                     gauges (deploy.metrics); answers also when no model is loaded, and needs no admin token

A record is a LaMP profile item: {"id", "date"?: "YYYY-MM-DD" | "YYYY", <the task's profile fields>}, e.g. for
LaMP_2N {"id": "r1", "date": "2021-03-04", "text": "...", "title": "...", "category": "politics"}.

Unknown users are served with row 0 of the user table, i.e. P_q only (from the history they send or the server
holds). Invalid requests get 422 with FastAPI's error shape (`detail[].loc` names the field) plus a one-line
`error`; feedback that contradicts the stored history gets 409 naming the field.

Run: `tapper serve --model-dir DIR`, or `uvicorn --factory deploy.app:app_from_env` with TAPPER_MODEL_DIR set.
If TAPPER_ADMIN_TOKEN is set, /reload requires `Authorization: Bearer <token>` (/metrics never does: scrapers need it).
"""
from __future__ import annotations

import hmac
import logging
import os
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from deploy.histories import HistoryError
from deploy.metrics import RequestMetricsMiddleware, ServingMetrics
from deploy.service import FeedbackConflict, ServeConfig, TapperService
from tapper.data.chronology import parse_lamp_date
from tapper.data.types import Record

log = logging.getLogger("tapper.serve")


def _id_text(v: Any) -> Any:
    # LaMP ids and user ids may be JSON integers; they are strings here.
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _date_text(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if isinstance(v, str):
        parse_lamp_date(v)  # ValueError -> 422 at the date field
    return v


IdStr = Annotated[str, BeforeValidator(_id_text), Field(min_length=1, max_length=512)]
DateStr = Annotated[str | None, BeforeValidator(_date_text)]


class RecordIn(BaseModel):
    """A LaMP profile item: id, optional date, and the task's fields as extra keys."""

    model_config = ConfigDict(extra="allow")
    id: IdStr
    date: DateStr = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: IdStr
    input: str | None = Field(None, min_length=1, description="the query as the task's full input text (LaMP `input`)")
    fields: dict[str, str] | None = Field(None, description="or the task's fields, e.g. {'text': ...}; the input is built from the task template")
    date: DateStr = Field(None, description="query date YYYY-MM-DD (default: the latest history date)")
    history: list[RecordIn] | None = Field(None, description="records to use in addition to the server's history store (not stored)")
    id: IdStr | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=512)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: IdStr
    records: list[RecordIn] = Field(min_length=1, max_length=1000, description="new records, with their answers, in time order")


class FieldProblem(Exception):
    def __init__(self, problems: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems))
        self.problems = problems


def _summary(errors: list[dict]) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)


def to_records(items: list[RecordIn] | None, loc: tuple, task, require_answer: bool) -> list[Record]:
    """Validated Records for the task; every problem names its field (body.records.0.category)."""
    out, problems = [], []
    for i, item in enumerate(items or []):
        extra = dict(item.model_extra or {})
        fields: dict[str, str] = {}
        for name, value in extra.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                problems.append({"loc": [*loc, i, name], "msg": f"must be a string, got {type(value).__name__}", "type": "string_type"})
                continue
            fields[name] = str(value)
        required = [f for f in task.profile_fields if require_answer or f != task.target_field]
        for name in required:
            if name not in fields:
                what = "the answer field" if name == task.target_field else "a field"
                problems.append({"loc": [*loc, i, name], "msg": f"{what} {task.name} records need", "type": "missing"})
        out.append(Record(id=item.id, fields=fields, date=parse_lamp_date(item.date), raw_date=item.date))
    if problems:
        raise FieldProblem(problems)
    return out


def create_app(cfg: ServeConfig | None = None, service: TapperService | None = None) -> FastAPI:
    svc = service or TapperService(cfg or ServeConfig.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not svc.ready:
            svc.load()  # a bundle that cannot be loaded stops the server (the pod restarts, visibly)
        yield

    app = FastAPI(title="tapper", summary="TAP-PER personalized generation with online feedback", lifespan=lifespan)
    app.state.service = svc
    # Per app, on its own registry (deploy.metrics); every request is counted, whatever answered it.
    metrics = ServingMetrics(svc)
    app.state.metrics = metrics
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors(), exclude={"input", "url", "ctx"})
        return JSONResponse(status_code=422, content={"detail": errors, "error": _summary(errors)})

    @app.exception_handler(FieldProblem)
    async def _field_problem(request: Request, exc: FieldProblem):
        return JSONResponse(status_code=422, content={"detail": exc.problems, "error": str(exc)})

    @app.exception_handler(FeedbackConflict)
    async def _conflict(request: Request, exc: FeedbackConflict):
        detail = [{"loc": list(exc.loc), "msg": exc.msg, "type": "conflict"}]
        return JSONResponse(status_code=409, content={"detail": detail, "error": _summary(detail)})

    @app.exception_handler(HistoryError)
    async def _bad_stored_history(request: Request, exc: HistoryError):
        # The server's own stored data is malformed (a hand-edited histories file): not the caller's fault.
        log.error("stored history is malformed: %s", exc)
        return JSONResponse(status_code=500, content={"detail": "a stored history is malformed", "error": str(exc)})

    def _svc() -> TapperService:
        if not svc.ready:
            raise HTTPException(503, "model not loaded")
        return svc

    # async: answered on the event loop. As a plain `def` it would queue for the thread pool behind predictions and
    # feedbacks waiting for the model lock, and a busy replica would fail its liveness probe and be restarted.
    # It reads attributes only (no lock, no I/O).
    @app.get("/health")
    async def health():
        if not svc.ready:
            return JSONResponse(status_code=503, content={"status": "unavailable", "detail": "model not loaded"})
        ld = svc.loaded
        return {"status": "ok", "task": ld.task.name, "model_version": ld.bundle.version, "generation": ld.generation,
                "sequence": ld.sequence}

    @app.get("/info")
    def info(max_users: int = 1000):
        return _svc().info(max_users=max(0, max_users))

    @app.post("/predict")
    def predict(req: PredictRequest):
        s = _svc()
        task = s.loaded.task
        if (req.input is None) == (req.fields is None):
            raise FieldProblem([{"loc": ["body", "input"], "type": "missing",
                                 "msg": "give exactly one of 'input' (the full query text) or 'fields' (the task's fields)"}])
        text = req.input
        if req.fields is not None:
            try:
                text = task.make_input(**req.fields)
            except ValueError as err:
                missing = str(err).rsplit("field ", 1)[-1].strip("'")
                raise FieldProblem([{"loc": ["body", "fields", missing], "msg": str(err), "type": "missing"}]) from None
        history = to_records(req.history, ("body", "history"), task, require_answer=False)
        return s.predict(req.user_id, text, history, parse_lamp_date(req.date), req.id, req.max_new_tokens)

    @app.post("/feedback")
    def feedback(req: FeedbackRequest):
        s = _svc()
        records = to_records(req.records, ("body", "records"), s.loaded.task, require_answer=True)
        result = s.feedback(req.user_id, records)
        metrics.feedback(result)
        return result

    @app.post("/reload")
    def reload(authorization: str | None = Header(default=None)):
        token = os.environ.get("TAPPER_ADMIN_TOKEN")
        if token and not hmac.compare_digest(authorization or "", f"Bearer {token}"):
            raise HTTPException(401, "reload needs 'Authorization: Bearer <TAPPER_ADMIN_TOKEN>'")
        try:
            ld = svc.load()
        except Exception as err:  # the old model keeps serving
            log.exception("reload failed")
            raise HTTPException(500, f"reload failed, still serving the previous model: {err}") from None
        return {"status": "reloaded", "model_version": ld.bundle.version, "generation": ld.generation, "sequence": ld.sequence,
                "n_users": len(ld.model.user_ids)}

    # async: runs on the event loop, not in the thread pool where predictions and feedbacks wait for the model
    # lock (a pool full of them would make a sync scrape wait); collecting reads attributes and /proc only.
    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request):
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(content=body, media_type=content_type)

    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory deploy.app:app_from_env` (TAPPER_MODEL_DIR etc., see ServeConfig.from_env)."""
    return create_app(ServeConfig.from_env())
