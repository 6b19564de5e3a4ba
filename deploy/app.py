"""FastAPI application serving a TAP-PER model bundle.

    GET    /health              200 once the model is loaded (503 before); probes use it            (no token)
    GET    /metrics             Prometheus metrics (deploy.metrics)                                  (no token)
    GET    /info                what is served; with the admin token also user ids and server paths  (token optional)
    POST   /predict             {"user_id", "input" | "fields", "date"?, "history"?, "id"?, "max_new_tokens"?}  (API)
    POST   /v1/completions      OpenAI's completions API, personalized by its `user` field (deploy.openai_api) (API)
    POST   /feedback            {"user_id", "records": [records with their answers]}                 (API)
    GET    /users/{id}          what is held about a user; /users/{id}/export all of it; DELETE erases it (API)
    POST   /reload              re-read the bundle and its newest live generation                   (admin)

A record is a LaMP profile item: {"id", "date"?: "YYYY-MM-DD" | "YYYY", <the task's profile fields>}, e.g. for
LaMP_2N {"id": "r1", "date": "2021-03-04", "text": "...", "title": "...", "category": "politics"}.

Every error is one JSON shape, declared in the OpenAPI document (deploy.errors). Limits (deploy.limits,
deploy.config.Limits) are checked before any model work. Predictions are async: they wait for their batch on
the event loop (deploy.batcher) and are dropped when their client disconnects; feedback and the admin
endpoints run in the thread pool.

Run: `tapper serve --model-dir DIR`, or `uvicorn --factory deploy.app:app_from_env` with TAPPER_MODEL_DIR set
(and the tokens, deploy.auth).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import errors
from deploy.auth import Authenticator, bearer_scheme
from deploy.config import ServeConfig
from deploy.durable import is_no_space
from deploy.errors import ApiError, FieldProblem, responses
from deploy.histories import HistoryError
from deploy.inference import PredictJob
from deploy.limits import BodyTooLarge, RequestLimitsMiddleware, too_large_items
from deploy.metrics import RequestMetricsMiddleware, ServingMetrics
from deploy.schemas import FeedbackRequest, PredictRequest, Problems, check_ids, to_records
from deploy.service import TapperService
from tapper.data.chronology import parse_lamp_date

log = logging.getLogger("tapper.serve")

# nginx's code for "client closed the request": counted in the metrics, never seen by the client.
CLIENT_GONE = 499


def _json(status: int, items: list[dict], headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=errors.body(items), headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body was read already, so the next ASGI message is the disconnect
    (the server answers `receive` with it when the connection closes, or once the response is complete)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def await_predictions(futures: list[Future], request: Request) -> list | None:
    """The results of queued predictions; if the client disconnects first, the jobs are cancelled (the batcher then
    drops those whose batch has not started) and None is returned. Waits on both events: no polling."""
    waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiting.done():
        return waiting.result()
    for f in futures:
        f.cancel()
    waiting.cancel()
    return None


def create_app(
    cfg: ServeConfig | None = None, service: TapperService | None = None, host: str | None = None
) -> FastAPI:
    cfg = cfg or (service.cfg if service else ServeConfig.from_env())
    cfg.auth.check_startable(host)  # fail closed: no tokens, no server (unless --insecure-local on loopback)
    svc = service or TapperService(cfg)
    auth = Authenticator(cfg.auth)
    limits = cfg.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not svc.ready:
            svc.load()  # a bundle that cannot be loaded stops the server (the pod restarts, visibly)
        yield
        svc.close()

    app = FastAPI(title="tapper", summary="TAP-PER personalized generation with online feedback", lifespan=lifespan)
    app.state.service = svc
    metrics = ServingMetrics(svc)
    app.state.metrics = metrics
    # Outermost first: metrics see every answer, including the limits' 413/503.
    app.add_middleware(
        RequestLimitsMiddleware,
        max_body_bytes=limits.max_body_bytes,
        max_inflight=limits.max_inflight,
        retry_after_s=cfg.batching.retry_after_s,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    # --- errors: one shape ----------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        items = jsonable_encoder(exc.errors(), exclude={"input", "url", "ctx"})
        status = 400 if any(e.get("type") == "json_invalid" for e in items) else 422
        return _json(status, items)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _json(exc.status, exc.items, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, BodyTooLarge):
            return _json(413, too_large_items(exc.limit), {"Connection": "close"})
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json(
            exc.status_code, [{"loc": [], "msg": str(exc.detail), "type": kind}], getattr(exc, "headers", None)
        )

    @app.exception_handler(HistoryError)
    async def _bad_stored_history(request: Request, exc: HistoryError):
        # The server's own stored data is malformed (a hand-edited histories file): not the caller's fault.
        log.error("stored history is malformed: %s", exc)
        return _json(500, [{"loc": [], "msg": str(exc), "type": "stored_history"}])

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError):
        if is_no_space(exc):
            return _json(
                507,
                [
                    {
                        "loc": [],
                        "msg": f"the disk is full ({exc.strerror or exc}); nothing was written",
                        "type": "insufficient_storage",
                    }
                ],
            )
        log.exception("I/O error", exc_info=exc)
        return _json(500, [{"loc": [], "msg": f"I/O error: {exc.strerror or exc}", "type": "io_error"}])

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Still logged with its traceback by the server; the client gets the shape, not a bare text/plain 500.
        return _json(500, [{"loc": [], "msg": f"internal error: {type(exc).__name__}", "type": "internal"}])

    def _ready() -> TapperService:
        svc.loaded  # noqa: B018 - NotReady (503) when no model is loaded
        return svc

    # --- health and info ------------------------------------------------------------------------------

    # async: answered on the event loop, never queued behind the thread pool; reads attributes only.
    @app.get("/health", responses=responses(503))
    async def health():
        ld = svc._loaded
        if ld is None:
            return JSONResponse(
                status_code=503,
                content={
                    "status": "unavailable",
                    **errors.body([{"loc": [], "msg": "model not loaded", "type": "not_ready"}]),
                },
            )
        return {
            "status": "ok",
            "task": ld.task.name,
            "model_version": ld.bundle.version,
            "generation": ld.generation,
            "sequence": ld.sequence,
        }

    @app.get("/info", responses=responses(401, 503), dependencies=[Depends(bearer_scheme)])
    def info(role: str = Depends(auth.optional), max_users: int = 1000):
        return _ready().info(admin=role == "admin", max_users=max(0, max_users))

    # --- predictions ----------------------------------------------------------------------------------

    def predict_job(req: PredictRequest) -> PredictJob:
        task = svc.loaded.task
        p = Problems()
        check_ids(p, limits, user_id=(["body", "user_id"], req.user_id), id=(["body", "id"], req.id))
        p.text(["body", "input"], req.input, limits.max_text_chars)
        for name, value in (req.fields or {}).items():
            p.text(["body", "fields", name], value, limits.max_text_chars)
        if req.max_new_tokens is not None and req.max_new_tokens > limits.max_new_tokens:
            p.add(["body", "max_new_tokens"], f"at most {limits.max_new_tokens}", "less_than_equal")
        if (req.input is None) == (req.fields is None):
            p.add(
                ["body", "input"],
                "give exactly one of 'input' (the full query text) or 'fields' (the task's fields)",
                "missing",
            )
        history = to_records(req.history, ("body", "history"), task, limits, feedback=False, p=p)
        p.raise_if_any()
        text = req.input
        if req.fields is not None:
            try:
                text = task.make_input(**req.fields)
            except ValueError as err:
                missing = str(err).rsplit("field ", 1)[-1].strip("'")
                raise FieldProblem([{"loc": ["body", "fields", missing], "msg": str(err), "type": "missing"}]) from None
        return PredictJob(
            user_id=req.user_id,
            text=text,
            history=history,
            query_date=parse_lamp_date(req.date),
            query_id=req.id,
            max_new_tokens=req.max_new_tokens,
        )

    @app.post("/predict", responses=responses(400, 401, 413, 422, 500, 503), dependencies=[Depends(bearer_scheme)])
    async def predict(req: PredictRequest, request: Request, role: str = Depends(auth.api)):
        s = _ready()
        results = await await_predictions([s.submit(predict_job(req))], request)
        if results is None:
            return Response(status_code=CLIENT_GONE)
        result = dict(results[0])
        result.pop("text", None)  # the raw decoded text: /v1/completions returns it; /predict the parsed prediction
        return result

    from deploy.openai_api import register as register_openai

    register_openai(app, svc, auth, limits, await_predictions, CLIENT_GONE)

    # --- writes ---------------------------------------------------------------------------------------

    @app.post(
        "/feedback", responses=responses(400, 401, 409, 413, 422, 500, 503, 507), dependencies=[Depends(bearer_scheme)]
    )
    def feedback(req: FeedbackRequest, role: str = Depends(auth.api)):
        s = _ready()
        p = Problems()
        check_ids(p, limits, user_id=(["body", "user_id"], req.user_id))
        records = to_records(req.records, ("body", "records"), s.loaded.task, limits, feedback=True, p=p)
        p.raise_if_any()
        result = s.feedback(req.user_id, records)
        metrics.feedback(result)
        return result

    UserId = Path(min_length=1, max_length=1024, description="the user id")

    @app.get("/users/{user_id}", responses=responses(401, 404, 503), dependencies=[Depends(bearer_scheme)])
    def user_summary(user_id: str = UserId, role: str = Depends(auth.api)):
        return _ready().user_summary(user_id)

    @app.get("/users/{user_id}/export", responses=responses(401, 404, 503), dependencies=[Depends(bearer_scheme)])
    def user_export(user_id: str = UserId, role: str = Depends(auth.api)):
        return _ready().user_export(user_id)

    @app.delete("/users/{user_id}", responses=responses(401, 404, 503, 507), dependencies=[Depends(bearer_scheme)])
    def delete_user(user_id: str = UserId, role: str = Depends(auth.api)):
        return _ready().delete_user(user_id)

    @app.post("/reload", responses=responses(401, 403, 500), dependencies=[Depends(bearer_scheme)])
    def reload(role: str = Depends(auth.admin)):
        try:
            ld = svc.load()
        except Exception as err:  # the old model keeps serving
            log.exception("reload failed")
            raise ApiError.one(
                500, [], f"reload failed, still serving the previous model: {err}", "reload_failed"
            ) from None
        return {
            "status": "reloaded",
            "model_version": ld.bundle.version,
            "generation": ld.generation,
            "sequence": ld.sequence,
            "n_users": len(ld.live_users()),
        }

    # async: on the event loop, not in the thread pool where feedbacks wait; reads attributes and /proc only.
    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request):
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(content=body, media_type=content_type)

    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory deploy.app:app_from_env` (TAPPER_MODEL_DIR, tokens etc., see ServeConfig.from_env)."""
    return create_app(ServeConfig.from_env())
