"""Form fields shared by the search and product routes (multipart bodies), and the route
class that reads their text as strict UTF-8."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import Form, Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

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


class Utf8MultiPartParser(MultiPartParser):
    """Starlette's multipart parser, except that a text field whose bytes are not valid in
    the body's charset (UTF-8 unless its Content-Type names another) is refused: Starlette
    would read it as Latin-1 and ``b"Caf\\xe9"`` would be stored as "Café"."""

    def on_part_end(self) -> None:
        # Starlette's private names: should a release rename them, the check is skipped (its
        # tests fail) rather than every upload
        part = getattr(self, "_current_part", None)
        charset = getattr(self, "_charset", "utf-8")
        if part is not None and getattr(part, "file", None) is None:
            try:
                bytes(part.data).decode(charset)
            except UnicodeDecodeError:
                name = "UTF-8" if charset == "utf-8" else charset
                raise MultiPartException(f"{part.field_name[:80]} is not valid {name}") from None
        super().on_part_end()


class Utf8FormRequest(Request):
    """A request whose multipart body is read by :class:`Utf8MultiPartParser`."""

    async def _get_form(self, **limits: Any) -> FormData:
        # ``limits`` (max_files, max_fields, max_part_size) are the parser's own arguments
        media_type = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if self._form is None and media_type == "multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    self._form = await Utf8MultiPartParser(self.headers, stream, **limits).parse()
            except MultiPartException as exc:  # FastAPI passes an HTTPException on as it is
                raise HTTPException(400, exc.message) from None
        return await super()._get_form(**limits)


class Utf8FormRoute(APIRoute):
    """Route class (``APIRouter(route_class=...)``) for routes whose form text is stored or
    matched against stored text: a field that is not valid UTF-8 is a 400 naming it, before
    the route runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def utf8_form_handler(request: Request) -> Response:
            return await handler(Utf8FormRequest(request.scope, request.receive))

        return utf8_form_handler
