"""What the routes ask FastAPI for: the service state, its settings and write authorisation.

The state lives on ``app.state.snapshop`` (set by :func:`snapshop.service.app.create_app`), so
routers are plain modules and a test can build as many apps as it likes.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from snapshop.service.errors import ApiError
from snapshop.service.settings import ServiceSettings
from snapshop.service.state import ServiceState

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="The service's API key (environment variable SNAPSHOP_API_KEY of `snapshop "
    "serve`); needed by every write. Without one the service is read-only.",
)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.snapshop
    return state


def get_settings(state: Annotated[ServiceState, Depends(get_state)]) -> ServiceSettings:
    return state.settings


State = Annotated[ServiceState, Depends(get_state)]
Settings = Annotated[ServiceSettings, Depends(get_settings)]


def key_refusal(settings: ServiceSettings, given: str | None) -> ApiError | None:
    """Why a write carrying ``given`` as its API key is refused (None: it is allowed).

    Used by :func:`require_key` and by the request guard, which refuses a keyless write
    before reading its body."""
    if settings.api_key is None:
        return ApiError(403, "writes are disabled: the service was started without an API key",
                        "writes_disabled")  # fmt: skip
    if not given:
        return ApiError(401, f"missing {API_KEY_HEADER} header",
                        headers={"WWW-Authenticate": "ApiKey"})  # fmt: skip
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        return ApiError(403, "wrong API key")
    return None


def require_key(
    settings: Settings, given: Annotated[str | None, Depends(api_key_header)] = None
) -> None:
    """Dependency of every write route (the guard has usually refused a bad key already)."""
    refusal = key_refusal(settings, given)
    if refusal is not None:
        raise refusal
