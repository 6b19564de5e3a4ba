"""Bearer-token checks that fail closed.

Two roles: an API token (prediction, /v1/completions, feedback, the per-user endpoints) and an admin token
(everything an API token opens, plus /reload and the user list and server paths in /info). /health and
/metrics need none (probes and scrapers; neither names a user). Without configured tokens the server does not
start (deploy.config.Auth.check_startable) unless --insecure-local, which serves on loopback only.

Comparison is on bytes with hmac.compare_digest against every configured token (no early exit on the first
match), so the time taken does not tell how much of a guess was right. Header values arrive decoded as latin-1;
a non-ASCII value is compared as its bytes and simply does not match (compare_digest on str raises for
non-ASCII, which was a 500).
"""

from __future__ import annotations

import hmac
from typing import Literal

from fastapi import Request
from fastapi.security import HTTPBearer

from deploy.config import Auth
from deploy.errors import ApiError

Role = Literal["admin", "api", "anonymous"]

# For the OpenAPI document only (the "Authorize" button); the checks below read the header themselves.
bearer_scheme = HTTPBearer(auto_error=False, description="API or admin token: `Authorization: Bearer <token>`")


def _matches(candidate: bytes, tokens: tuple[str, ...]) -> bool:
    found = False
    for token in tokens:
        found |= hmac.compare_digest(candidate, token.encode("ascii"))
    return found


class Authenticator:
    def __init__(self, auth: Auth):
        self.auth = auth

    def role(self, header: str | None) -> Role:
        """The role a request's Authorization header grants; a header with a wrong token is a 401, not anonymous."""
        if self.auth.open:
            return "admin"
        if header is None:
            return "anonymous"
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("the Authorization header must be 'Bearer <token>'")
        candidate = value.strip().encode("utf-8", "surrogateescape")
        if _matches(candidate, self.auth.admin_tokens):
            return "admin"
        if _matches(candidate, self.auth.api_tokens):
            return "api"
        raise _unauthorized("the token is not valid")

    # FastAPI dependencies ----------------------------------------------------------------------------

    def optional(self, request: Request) -> Role:
        return self.role(request.headers.get("authorization"))

    def api(self, request: Request) -> Role:
        role = self.optional(request)
        if role == "anonymous":
            raise _unauthorized("this endpoint needs 'Authorization: Bearer <API or admin token>'")
        return role

    def admin(self, request: Request) -> Role:
        role = self.api(request)
        if role != "admin":
            raise ApiError.one(403, ["header", "authorization"], "this endpoint needs the admin token", "forbidden")
        return role


def _unauthorized(msg: str) -> ApiError:
    return ApiError.one(401, ["header", "authorization"], msg, "unauthorized", {"WWW-Authenticate": "Bearer"})
