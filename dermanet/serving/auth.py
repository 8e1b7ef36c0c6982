"""Who is asking: `Authorization: Bearer KEY` on every `/v1` route (health checks and the API
docs stay open). A missing, unknown or revoked key is a 401; the key never reaches a log or an
error message (only its account's name does, in the audit)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from starlette._utils import get_route_path
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from dermanet.accounts.store import Principal, authenticate
from dermanet.serving.cases_context import current
from dermanet.serving.uploads import ApiError

log = logging.getLogger("ray.serve")
PROTECTED_PREFIX = "/v1/"
PRINCIPAL = "principal"  # request.state attribute set for authenticated requests
CHALLENGE = {"WWW-Authenticate": "Bearer"}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def bearer_key(headers: Headers) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, key = value.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _find(key: str) -> Principal | None:
    with current().sessions() as session:
        return authenticate(session, key)


class AuthMiddleware:
    """Authenticates `/v1/...` requests before any route runs (so no route can forget to);
    the route then reads `request.state.principal`."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not get_route_path(scope).startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        key = bearer_key(Headers(scope=scope))
        if key is None:
            await _deny(send, "sign in: send your DermaNet key as 'Authorization: Bearer KEY'")
            return
        try:
            principal = await run_in_threadpool(_find, key)
        except Exception as exc:  # the database is down: not the caller's fault, say so
            log.error("key check failed: %s", type(exc).__name__)
            await _deny(send, "accounts database unavailable; retry later", status=503)
            return
        if principal is None:
            await _deny(send, "unknown or revoked key; ask an admin for a valid one")
            return
        scope.setdefault("state", {})[PRINCIPAL] = principal
        await self.app(scope, receive, send)


async def _deny(send: Send, message: str, status: int = 401) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def principal(request: Request) -> Principal:
    """The account of an authenticated request (the middleware guarantees one on /v1)."""
    found = getattr(request.state, PRINCIPAL, None)
    if found is None:
        raise ApiError(401, "not signed in")
    return found


def require_admin(request: Request) -> Principal:
    """FastAPI dependency: the caller, who must be an admin (else 403)."""
    who = principal(request)
    if not who.is_admin:
        raise ApiError(403, f"account {who.name!r} ({who.role}) may not do this: admins only")
    return who
