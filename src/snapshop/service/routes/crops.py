"""/v1/crops/{id}/thumb: the garment crop an item result matched, cut from its catalog image.

Addressed by crop id rather than by an image id and a free box, so the thumbnail cache holds
at most one file per stored crop and size, whatever clients ask for.
"""

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from snapshop.service.dependencies import State
from snapshop.service.errors import error_responses
from snapshop.service.settings import ServiceSettings
from snapshop.service.thumbs import crop_pixels, crop_thumbnail, image_response, snap_size


def router(settings: ServiceSettings) -> APIRouter:
    routes = APIRouter(prefix="/v1/crops", tags=["images"])
    sizes = ", ".join(map(str, settings.thumb_sizes))

    @routes.get("/{crop_id}/thumb", response_class=FileResponse, responses={
        200: {"content": {"image/jpeg": {}}, "description": "JPEG of the crop"},
        **error_responses(404, 422, 500)},
        description=("JPEG of a garment crop (the `crop_id` of an item result): its box cut "
                     "from the catalog image; `size` snaps up to one of "
                     f"{sizes} (cached on disk)."),
    )  # fmt: skip
    def get_crop_thumb(
        state: State,
        crop_id: int,
        size: Annotated[int | None, Query(ge=1, le=100_000, description="longest side")] = None,
    ) -> Response:
        crop = state.catalog.get_crop(crop_id)
        image = state.catalog.get_image(crop.image_id)
        box = crop_pixels(crop, image)
        side = snap_size(size, state.settings.thumb_sizes)
        body = crop_thumbnail(state.catalog, image, box, side)
        tag = f'"{image.sha256}-{"_".join(map(str, box))}"'
        headers = {"ETag": tag, "Cache-Control": "public, max-age=86400"}
        return image_response(body, "image/jpeg", headers)

    return routes
