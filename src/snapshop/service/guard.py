"""The request guard: a pure ASGI middleware that judges a request by its headers before any
of its body is read, then counts the body while the application reads it.

- A body over its limit is refused: at once when ``Content-Length`` says so, otherwise (a
  chunked upload) as soon as the bytes read pass the limit; the application never sees more
  than ``limit`` bytes and the rest is never read.
- A write without a valid API key is refused before its body is read, so a keyless client
  cannot make the server read (and spool to disk) anything.

Refusals sent while the client may still be sending carry ``Connection: close``: the server
then drops the connection instead of reading the rest of the body to keep it alive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snapshop.service.errors import ApiError, error_response

CLOSE = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes its limit. An HTTPException, so FastAPI's
    body parsing passes it through to the JSON error handlers unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the {limit} byte limit", headers=CLOSE)


@dataclass(frozen=True)
class BodyLimits:
    """Bytes a request body may hold: ``by_path`` for the upload routes, ``default`` else."""

    default: int
    by_path: Mapping[str, int] = field(default_factory=dict)

    def for_scope(self, scope: Scope) -> int:
        return self.by_path.get(scope["path"], self.default)


def routes_depending_on(
    routes: Sequence[BaseRoute], dependency: Callable[..., Any]
) -> list[APIRoute]:
    """Those of ``routes`` that declare ``dependency`` (directly) among their dependencies."""
    return [
        route
        for route in routes
        if isinstance(route, APIRoute)
        and any(dep.call is dependency for dep in route.dependant.dependencies)
    ]


def matches_any(routes: list[APIRoute], scope: Scope) -> bool:
    """Whether one of ``routes`` would handle this request (path and method)."""
    return any(route.matches(scope)[0] is Match.FULL for route in routes)


class RequestGuard:
    """Pure ASGI middleware; ``refuse(scope)`` answers why a request is refused from its
    headers alone (None: let it through)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: BodyLimits,
        refuse: Callable[[Scope], ApiError | None],
    ) -> None:
        self.app = app
        self.limits = limits
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_scope(scope)
        refusal = _length_refusal(Headers(scope=scope).get("content-length"), limit)
        refusal = refusal or self.refuse(scope)
        if refusal is not None:
            headers = {**(refusal.headers or {}), **CLOSE}
            response = error_response(refusal.status, refusal.detail, refusal.code, headers)
            await response(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            if received > limit:  # refused already: read nothing more
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # not turned into a response on the way out
            if started:
                raise
            await error_response(413, exc.detail, headers=CLOSE)(scope, receive, send)


def _length_refusal(length: str | None, limit: int) -> ApiError | None:
    if length is None:
        return None
    if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
        return ApiError(400, "invalid Content-Length header")
    if int(length) > limit:
        return ApiError(413, f"request body is {length} bytes, limit is {limit}")
    return None
