"""Request limits applied before any route runs (pure ASGI middleware: no extra task, nothing buffered).

- Body size: a Content-Length over the limit is answered 413 at once, without reading the body; a body without
  one (chunked) is counted as it streams and refused as soon as it passes the limit. Before this, a 50 MB
  /predict was read, parsed and tokenized whole (8.6 GB of memory, no answer in 150 s).
- Requests in progress: past `max_inflight` a request is answered 503 with Retry-After instead of piling up in
  the thread pool and the event loop. /health and /metrics are never refused (probes and scrapers must see a
  busy replica as alive).
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.errors import body as error_body

UNLIMITED_PATHS = ("/health", "/metrics")


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a streamed body passes the limit. An HTTPException, so that FastAPI's body
    reader passes it on (it turns any other exception while reading into a 400) to the app's handler."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")
        self.limit = limit


def too_large_items(limit: int) -> list[dict]:
    return [
        {"loc": ["body"], "msg": f"the request body is larger than the limit of {limit} bytes", "type": "too_large"}
    ]


async def send_json(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class RequestLimitsMiddleware:
    def __init__(self, app, max_body_bytes: int, max_inflight: int, retry_after_s: int = 1):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.inflight = 0  # touched on the event loop only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            await send_json(
                send,
                503,
                error_body(
                    [{"loc": [], "msg": f"{self.inflight} requests in progress; retry later", "type": "overloaded"}]
                ),
                {"Retry-After": str(self.retry_after_s)},
            )
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            # Answer before reading: the client may still be sending; the server closes the connection after.
            await send_json(send, 413, error_body(too_large_items(self.max_body_bytes)), {"Connection": "close"})
            return
        seen = 0
        limit = self.max_body_bytes

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        self.inflight += 1
        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            # Only reached if no handler answered it (e.g. a route reading the body itself).
            if not started:
                await send_json(send, 413, error_body(too_large_items(limit)), {"Connection": "close"})
        finally:
            self.inflight -= 1


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server (h11/httptools) rejects a malformed one before we get here
    return None
