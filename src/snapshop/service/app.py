"""The FastAPI application: ``create_app(settings)`` assembles the routers under ``/v1``
(``service/routes/``), the JSON error handlers and the request guard; ``serve`` runs it.

Endpoints are plain ``def`` functions, so FastAPI runs them in its thread pool and the
CPU-bound work (decode, detect, embed) never blocks the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snapshop import api
from snapshop.detect.base import Detector
from snapshop.search import Searcher
from snapshop.service.convert import decode_cursor, encode_cursor
from snapshop.service.dependencies import API_KEY_HEADER, key_refusal, require_key
from snapshop.service.errors import (
    COMMON_ERRORS,
    ApiError,
    error_responses,
    install_error_handlers,
)
from snapshop.service.guard import (
    BodyLimits,
    BodyTimeouts,
    RequestGuard,
    matches_any,
    routes_depending_on,
)
from snapshop.service.routes import crops, images, pages, products, search, service, similar
from snapshop.service.settings import ServiceSettings
from snapshop.service.state import ServiceState

log = logging.getLogger(__name__)


def create_app(
    settings: ServiceSettings,
    *,
    searcher: Searcher | None = None,
    detector: Detector | None = None,
) -> FastAPI:
    """The snapshop HTTP service over ``settings.catalog_dir``.

    ``searcher`` (tests, embedding apps) replaces opening the catalog; ``detector`` replaces
    ``settings.detector``. The app closes the catalog it opened on shutdown.
    """
    owned = searcher is None
    if searcher is None:
        searcher = api.open_searcher(
            settings.catalog_dir,
            model=settings.model,
            detector=detector if detector is not None else settings.detector,
            embed_threads=settings.embed_threads,
            ranking=settings.ranking,
            flip_query=settings.flip_query,
            verify=settings.verify,
        )
        searcher.embedder.open_sessions()
    state = ServiceState(settings, searcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            state.catalog.close()

    app = FastAPI(
        lifespan=lifespan,
        title="snapshop",
        version="1",
        summary="Visual search for e-commerce: photograph a product, find similar ones.",
        responses=error_responses(*COMMON_ERRORS),
        docs_url=None,
    )
    app.state.snapshop = state
    routers = (search.router(settings), products.router(settings), similar.router(settings),
               images.router(settings), crops.router(settings), service.router(),
               pages.router())  # fmt: skip
    pages.install_offline_docs(app)
    for router in routers:
        app.include_router(router)
    # The routers' own routes: FastAPI may keep an included router as one opaque entry.
    routes = [route for router in routers for route in router.routes]
    routes += [route for route in app.router.routes if isinstance(route, Route)]
    install_error_handlers(app, routes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    write_routes = routes_depending_on(routes, require_key)

    def refuse(scope: Scope) -> ApiError | None:
        if not matches_any(write_routes, scope):
            return None
        key = dict(scope["headers"]).get(API_KEY_HEADER.lower().encode())
        return key_refusal(settings, key.decode("latin-1") if key is not None else None)

    limits = BodyLimits(
        default=settings.max_json_bytes,
        by_path={
            "/v1/search": settings.max_search_request_bytes,
            "/v1/search/crop": settings.max_search_request_bytes,
            "/v1/products": settings.max_request_bytes,
        },
    )
    timeouts = BodyTimeouts(idle_s=settings.body_idle_timeout_s, total_s=settings.body_timeout_s)
    app.add_middleware(RequestGuard, limits=limits, refuse=refuse, timeouts=timeouts)
    app.add_middleware(NoSniff)  # outermost: the guard's own refusals carry it too
    return app


class NoSniff:
    """``X-Content-Type-Options: nosniff`` on every answer: a browser takes a JSON error that
    quotes the request, or an image, for what its content type says, never for a page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_header)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the null dropped from optional form fields: a multipart
    field cannot carry a JSON null (a client would send the text "null"); leaving the field
    out is how a form says "none"."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        if name.startswith("Body_"):  # FastAPI's name for a form body's model
            for field in component.get("properties", {}).values():
                _drop_null(field)
    return schema


def _drop_null(field: dict[str, Any]) -> None:
    options = field.get("anyOf")
    if not options or {"type": "null"} not in options:
        return
    kept = [o for o in options if o != {"type": "null"}]
    del field["anyOf"]
    if len(kept) == 1:
        field.update(kept[0])
    else:
        field["anyOf"] = kept
    if field.get("default", ...) is None:
        del field["default"]


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000,
          detector: Detector | None = None) -> None:  # fmt: skip
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    from snapshop.service.protocol import raise_open_files_limit, timed_protocol

    app = create_app(settings, detector=detector)
    raise_open_files_limit()
    log.info("serving %s on http://%s:%d", settings.catalog_dir, host, port)
    uvicorn.run(
        app, host=host, port=port, log_level="info",
        http=timed_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
    )  # fmt: skip


__all__ = ["create_app", "decode_cursor", "encode_cursor", "serve"]
