"""HTTP errors of the service and the handlers that turn every failure into JSON."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from snapshop.errors import (
    CatalogBusyError,
    CatalogError,
    CatalogUnavailableError,
    ConfigError,
    ImageDecodeError,
    ManifestError,
    ModelError,
    NotFoundError,
    SnapshopError,
    StoredFileError,
)
from snapshop.service.schemas import ErrorBody

log = logging.getLogger(__name__)

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 408: "request_timeout", 409: "conflict",
                 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_request",
                 429: "too_many_requests", 503: "unavailable"}  # fmt: skip
# What each error status means in this API (the OpenAPI document's response descriptions).
ERROR_MEANINGS = {
    400: "Malformed request (bad Content-Length, a parameter the API refuses), or an image "
         "that cannot be decoded (code bad_image) or is empty (empty_upload)",
    401: "Missing X-API-Key header",
    403: "Wrong API key, or writes are disabled (code writes_disabled)",
    404: "No such product, image or path",
    408: "The client sent its headers or body too slowly (the connection is closed)",
    409: "Stored, then deleted by another request before the answer: send it again",
    413: "Request body, upload (bytes) or image (pixels, code too_many_pixels) over the limits",
    415: "Not a supported image type (judged from the bytes, not the name or content-type)",
    422: "A parameter or body field failed validation (code invalid_request)",
    429: "Too many searches in flight; retry after the Retry-After header's seconds",
    500: "A stored catalog file is damaged (code stored_image_corrupt) or an unexpected fault",
    503: "The model is unavailable, or the catalog's database cannot be reached (code "
         "catalog_unavailable; retry after the Retry-After header's seconds)",
}  # fmt: skip
# Every operation can meet these: the request guard and the HTTP parser answer them.
COMMON_ERRORS = (400, 408, 413)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` declaring ``statuses`` with the ``{"code", "detail"}`` body."""
    return {s: {"model": ErrorBody, "description": ERROR_MEANINGS[s]} for s in statuses}


class ApiError(Exception):
    """An error with its HTTP status, machine code and human message."""

    def __init__(
        self,
        status: int,
        detail: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or _STATUS_CODES.get(status, "error")
        self.headers = headers


def error_response(
    status: int, detail: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"code": code or _STATUS_CODES.get(status, "error"), "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form")]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute] = ()) -> None:
    """Map snapshop's typed errors to 4xx JSON; anything unexpected is a logged JSON 500.
    ``routes``: the app's routes, for the ``Allow`` header of a 405."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.detail, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette lists only the first matching route's methods
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(routes, request))}
        return error_response(exc.status_code, detail, headers=headers)

    @app.exception_handler(ImageDecodeError)
    async def _decode(request: Request, exc: ImageDecodeError) -> JSONResponse:
        return error_response(400, f"cannot decode the image: {exc.reason}", "bad_image")

    @app.exception_handler(ConfigError)
    async def _config(request: Request, exc: ConfigError) -> JSONResponse:
        return error_response(400, str(exc), "bad_parameter")

    @app.exception_handler(ManifestError)
    async def _manifest(request: Request, exc: ManifestError) -> JSONResponse:
        return error_response(400, str(exc), "bad_metadata")

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return error_response(404, str(exc))

    corrupt_logged = _LoggedOnce()

    @app.exception_handler(StoredFileError)
    async def _stored_file(request: Request, exc: StoredFileError) -> JSONResponse:
        if corrupt_logged.first(exc.path):
            log.error("damaged catalog file %s (%s); re-ingest its product", exc.path, exc.reason)
        return error_response(500, "a stored catalog image is damaged (logged on the server)",
                              "stored_image_corrupt")  # fmt: skip

    unreachable_logged = _LoggedOnce()

    @app.exception_handler(CatalogUnavailableError)
    async def _unavailable(request: Request, exc: CatalogUnavailableError) -> JSONResponse:
        if unreachable_logged.first(str(exc)):
            log.error("catalog unavailable: %s", exc)
        return error_response(503, "the catalog database cannot be reached; retry shortly",
                              "catalog_unavailable", headers={"Retry-After": "1"})  # fmt: skip

    @app.exception_handler(CatalogBusyError)
    async def _busy(request: Request, exc: CatalogBusyError) -> JSONResponse:
        return error_response(503, "another writer holds the catalog (an ingest, a reindex?);"
                              " retry shortly: images this request stored before it waited"
                              " are kept, and the retry skips them", "catalog_busy",
                              headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(CatalogError)
    async def _catalog(request: Request, exc: CatalogError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(ModelError)
    async def _model(request: Request, exc: ModelError) -> JSONResponse:
        log.error("model error: %s", exc)
        return error_response(503, f"the model is unavailable: {exc}")

    @app.exception_handler(SnapshopError)
    async def _snapshop(request: Request, exc: SnapshopError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette answers this one outside every middleware, NoSniff included: add it here.
        return error_response(500, "internal server error (logged on the server)", "internal",
                              headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip


def allowed_methods(routes: Sequence[BaseRoute], request: Request) -> list[str]:
    """Every method one of ``routes`` accepts on this request's path (a 405's ``Allow``)."""
    methods: set[str] = set()
    for route in routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(route_methods)
    return sorted(methods)


class _LoggedOnce:
    """Remembers which keys were logged, so a damaged file requested again and again is
    logged once, not once per request. Bounded: past ``limit`` keys it stops remembering."""

    def __init__(self, limit: int = 10_000) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, key: str) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) < self._limit:
                self._seen.add(key)
            return True
