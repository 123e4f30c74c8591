"""HTTP errors of the service and the handlers that turn every failure into JSON."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from snapshop.errors import (
    CatalogError,
    ConfigError,
    ImageDecodeError,
    ManifestError,
    ModelError,
    SnapshopError,
)

log = logging.getLogger(__name__)

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_request",
                 429: "too_many_requests", 503: "unavailable"}  # fmt: skip


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


def install_error_handlers(app: FastAPI) -> None:
    """Map snapshop's typed errors to 4xx JSON; anything unexpected is a logged JSON 500."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.detail, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(ImageDecodeError)
    async def _decode(request: Request, exc: ImageDecodeError) -> JSONResponse:
        return error_response(400, f"cannot decode the image: {exc.reason}", "bad_image")

    @app.exception_handler(ConfigError)
    async def _config(request: Request, exc: ConfigError) -> JSONResponse:
        return error_response(400, str(exc), "bad_parameter")

    @app.exception_handler(ManifestError)
    async def _manifest(request: Request, exc: ManifestError) -> JSONResponse:
        return error_response(400, str(exc), "bad_metadata")

    @app.exception_handler(CatalogError)
    async def _catalog(request: Request, exc: CatalogError) -> JSONResponse:
        message = str(exc)
        status = 404 if message.startswith("no ") else 400
        return error_response(status, message)

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
        return error_response(500, "internal server error (logged on the server)", "internal")
