"""/v1/images/{id} and its thumbnails: catalog image files, by catalog id only."""

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from snapshop.catalog.store import ImageRow
from snapshop.service.dependencies import State
from snapshop.service.errors import error_responses
from snapshop.service.settings import ServiceSettings
from snapshop.service.thumbs import image_response, original, snap_size, thumbnail

MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff"}  # fmt: skip


def _image_headers(image: ImageRow) -> dict[str, str]:
    return {"ETag": f'"{image.sha256}"', "Cache-Control": "public, max-age=86400"}


def router(settings: ServiceSettings) -> APIRouter:
    routes = APIRouter(prefix="/v1/images", tags=["images"])
    sizes = ", ".join(map(str, settings.thumb_sizes))

    @routes.get("/{image_id}", response_class=FileResponse, responses={
        200: {"content": {t: {} for t in sorted(set(MEDIA_TYPES.values()))},
              "description": "The image file"}, **error_responses(404, 422)})  # fmt: skip
    def get_image(state: State, image_id: int) -> Response:
        """The stored catalog image (by catalog id only); a server catalog stores a JPEG
        thumbnail of each image (longest side 320), and that is what it returns."""
        image = state.catalog.get_image(image_id)
        body, media = original(state.catalog, image)
        if media is None:
            suffix = body.suffix if isinstance(body, Path) else ""
            media = MEDIA_TYPES.get(suffix, "application/octet-stream")
        return image_response(body, media, _image_headers(image))

    @routes.get("/{image_id}/thumb", response_class=FileResponse, responses={
        200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"},
        **error_responses(404, 422, 500)},
        description=f"JPEG thumbnail; `size` snaps up to one of {sizes} (cached on disk)."
    )  # fmt: skip
    def get_thumb(
        state: State,
        image_id: int,
        size: Annotated[int | None, Query(ge=1, le=100_000, description="longest side")] = None,
    ) -> Response:
        image = state.catalog.get_image(image_id)
        side = snap_size(size, state.settings.thumb_sizes)
        body = thumbnail(state.catalog, image, side)
        return image_response(body, "image/jpeg", _image_headers(image))

    return routes
