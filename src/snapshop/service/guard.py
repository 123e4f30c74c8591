"""The request guard: a pure ASGI middleware that judges a request by its headers before any
of its body is read, then counts the body while the application reads it.

- A body over its limit is refused: at once when ``Content-Length`` says so, otherwise (a
  chunked upload) as soon as the bytes read pass the limit; the application never sees more
  than ``limit`` bytes and the rest is never read.
- A write without a valid API key is refused before its body is read, so a keyless client
  cannot make the server read (and spool to disk) anything.
- A body that stalls is refused with a 408: when the client sends nothing for
  ``idle_s`` seconds, or has not finished the whole body ``total_s`` seconds after its headers.
- A multipart body that ends before its closing boundary (a client cut off mid-upload) is a
  400 saying so: the form parser would drop the unfinished part without a word, and the
  request would fail as if the client had never sent its image.

Refusals sent while the client may still be sending carry ``Connection: close``: the server
then drops the connection instead of reading the rest of the body to keep it alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snapshop.service.errors import ApiError, error_response

CLOSE = {"Connection": "close"}


class BodyRefused(HTTPException):
    """Raised from ``receive`` when the rest of a body will not be read. An HTTPException, so
    FastAPI's body parsing passes it through to the JSON error handlers unchanged."""


class BodyTooLarge(BodyRefused):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the {limit} byte limit", headers=CLOSE)


class BodyTimeout(BodyRefused):
    def __init__(self, detail: str) -> None:
        super().__init__(408, detail, headers=CLOSE)


class BodyIncomplete(BodyRefused):
    def __init__(self) -> None:
        super().__init__(400, "the multipart body ends before its closing boundary (an upload"
                         " cut off?)", headers=CLOSE)  # fmt: skip


class ClosingBoundary:
    """Watches a multipart body go by for its closing delimiter (``--boundary--``)."""

    def __init__(self, content_type: str | None) -> None:
        self.delimiter: bytes | None = None
        self.seen = False
        self._tail = b""
        if content_type and content_type.lower().startswith("multipart/"):
            _, params = parse_options_header(content_type)
            if params.get(b"boundary"):
                self.delimiter = b"--" + params[b"boundary"] + b"--"

    def feed(self, chunk: bytes) -> None:
        if self.delimiter is None or self.seen:
            return
        window = self._tail + chunk
        self.seen = self.delimiter in window
        self._tail = window[-len(self.delimiter) :]

    @property
    def missing(self) -> bool:
        return self.delimiter is not None and not self.seen


@dataclass(frozen=True)
class BodyTimeouts:
    """Seconds a client may send nothing while its body is due (``idle_s``), and may take
    over the whole body, counted from its headers (``total_s``)."""

    idle_s: float
    total_s: float


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
        timeouts: BodyTimeouts,
    ) -> None:
        self.app = app
        self.limits = limits
        self.refuse = refuse
        self.timeouts = timeouts

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
        body_done = False
        closing = ClosingBoundary(Headers(scope=scope).get("content-type"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.total_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if received > limit:  # refused already: read nothing more
                raise BodyTooLarge(limit)
            if body_done:  # only a disconnect can come now: the app may wait for it
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), min(self.timeouts.idle_s, left))
            except TimeoutError:
                raise BodyTimeout(_timeout_detail(left <= self.timeouts.idle_s, self.timeouts,
                                                  received)) from None  # fmt: skip
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise BodyTooLarge(limit)
                closing.feed(chunk)
                body_done = not message.get("more_body", False)
                if body_done and received and closing.missing:
                    raise BodyIncomplete()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyRefused as exc:  # not turned into a response on the way out
            if started:
                raise
            await error_response(exc.status_code, exc.detail, headers=CLOSE)(scope, receive, send)


def _timeout_detail(whole: bool, timeouts: BodyTimeouts, received: int) -> str:
    if whole:
        return (f"the request body took longer than {timeouts.total_s:g} s"
                f" ({received} bytes received)")  # fmt: skip
    return (f"no data from the client for {timeouts.idle_s:g} s while its request body was"
            f" due ({received} bytes received)")  # fmt: skip


def _length_refusal(length: str | None, limit: int) -> ApiError | None:
    if length is None:
        return None
    if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
        return ApiError(400, "invalid Content-Length header")
    if int(length) > limit:
        return ApiError(413, f"request body is {length} bytes, limit is {limit}")
    return None
