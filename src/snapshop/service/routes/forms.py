"""Form fields shared by the search routes (multipart bodies)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form

from snapshop.catalog.fields import LIMITS
from snapshop.detect.base import POSITIONS
from snapshop.service.errors import ApiError
from snapshop.service.settings import ServiceSettings
from snapshop.service.uploads import ACCEPTED

Category = Annotated[str | None, Form(max_length=LIMITS.category, description="only this category")]
Price = Annotated[float | None, Form(ge=0, allow_inf_nan=False)]
# The enum is declared for clients; an unknown value is a 400 from check_position.
Position = Annotated[
    str | None,
    Form(description="upper or lower", json_schema_extra={"enum": list(POSITIONS)}),
]
Coord = Annotated[float, Form(allow_inf_nan=False, description="query-image pixels")]


def image_limits(settings: ServiceSettings) -> str:
    return (f"{ACCEPTED}, judged from the bytes; at most {settings.max_upload_bytes} bytes and "
            f"{settings.max_pixels} pixels (413 beyond)")  # fmt: skip


def check_position(position: str | None) -> str | None:
    if position in (None, ""):
        return None
    if position not in POSITIONS:
        raise ApiError(400, f"position must be one of {list(POSITIONS)}, got {position!r}")
    return position
