"""One JSON shape for every error the server answers, and the exceptions that carry it.

    {"error": "<one line: what went wrong and where>",
     "detail": [{"loc": ["body", "records", 0, "category"], "msg": "...", "type": "..."}]}

`detail[].loc` names the field (FastAPI's own validation errors already look like this, so a client parses one
shape whatever answered). Which statuses mean what:

    400  the body is not JSON                        409  contradicts what is stored (duplicate id, out of order)
    401  no or a wrong token                         413  the body is larger than the limit
    403  a token without the right (admin)           422  a field is invalid (named in loc)
    404  no such user / route                        503  no model loaded, or the prediction queue is full
    500  the server's own stored data is malformed   507  the disk is full: nothing was written, still serving

Routes declare these in OpenAPI with `responses(...)`.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import BaseModel, Field


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where the problem is, e.g. ['body', 'records', 0, 'category']")
    msg: str
    type: str


class ErrorBody(BaseModel):
    error: str = Field(description="one line: every problem with its location")
    detail: list[ErrorItem]


DESCRIPTIONS = {
    400: "the body is not valid JSON",
    401: "missing or wrong bearer token",
    403: "the token does not grant this (an admin token is needed)",
    404: "no such user",
    409: "contradicts the stored history (duplicate record id, a date before the user's latest record)",
    413: "request body larger than the limit",
    422: "a field is invalid; detail[].loc names it",
    500: "the server's stored data is malformed (names the file and line)",
    503: "no model loaded, or the prediction queue is full (see Retry-After)",
    507: "the disk is full: nothing was written, the server keeps serving",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a route: each code with the shared error body."""
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS[code]} for code in codes}


def summary(items: Sequence[dict]) -> str:
    def one(e: dict) -> str:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        return f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", ""))

    return "; ".join(one(e) for e in items)


def body(items: list[dict]) -> dict:
    return {"error": summary(items), "detail": items}


class ApiError(Exception):
    """An answer in the error shape: `status`, the problems (loc, msg, type) and extra headers (Retry-After...)."""

    def __init__(self, status: int, items: list[dict], headers: dict[str, str] | None = None):
        super().__init__(summary(items))
        self.status = status
        self.items = items
        self.headers = headers or {}

    @classmethod
    def one(
        cls, status: int, loc: Sequence[str | int], msg: str, type_: str, headers: dict[str, str] | None = None
    ) -> "ApiError":
        return cls(status, [{"loc": list(loc), "msg": msg, "type": type_}], headers)


class FieldProblem(ApiError):
    """422: the request is well-formed JSON but fields are invalid for this task (each problem names its field)."""

    def __init__(self, items: list[dict]):
        super().__init__(422, items)


class FeedbackConflict(ApiError):
    """409: feedback that contradicts the user's stored history (duplicate id, a date before the latest record)."""

    def __init__(self, loc: tuple, msg: str):
        super().__init__(409, [{"loc": list(loc), "msg": msg, "type": "conflict"}])
        self.loc = loc
        self.msg = msg


class QueueFull(ApiError):
    def __init__(self, retry_after: int):
        super().__init__(
            503,
            [{"loc": [], "msg": "the prediction queue is full; retry later", "type": "overloaded"}],
            {"Retry-After": str(retry_after)},
        )


class NotReady(ApiError):
    def __init__(self) -> None:
        super().__init__(503, [{"loc": [], "msg": "model not loaded", "type": "not_ready"}], {"Retry-After": "5"})
