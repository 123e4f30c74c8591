"""POST /v1/search and /v1/search/crop: a photo in, similar products out."""

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from snapshop.detect.base import Box
from snapshop.images import DecodeLimits
from snapshop.search import ProductFilter
from snapshop.service.convert import search_response
from snapshop.service.dependencies import State
from snapshop.service.errors import ApiError, error_responses
from snapshop.service.routes.forms import (
    Category,
    Coord,
    Position,
    Price,
    Utf8FormRoute,
    check_position,
    image_limits,
)
from snapshop.service.schemas import SearchResponse
from snapshop.service.settings import ServiceSettings
from snapshop.service.state import ServiceState
from snapshop.service.uploads import decode_upload, read_bounded

SEARCH_ERRORS = error_responses(415, 422, 429, 503)


def run_search(
    state: ServiceState, upload: UploadFile, k: int | None, filters: ProductFilter, **kwargs: Any
) -> SearchResponse:
    """Decode the upload within the limits, then search under a search slot and the read lock."""
    settings = state.settings
    limits = DecodeLimits(max_pixels=settings.max_pixels, max_bytes=settings.max_upload_bytes)
    start = time.perf_counter()
    with state.search_slot():
        data = read_bounded(upload.file, settings.max_upload_bytes)
        pixels = decode_upload(data, limits)
        decode_ms = (time.perf_counter() - start) * 1e3
        with state.reading():
            result = state.searcher.search(
                pixels, k or settings.default_k, filters=filters, **kwargs
            )
    return search_response(result, (time.perf_counter() - start) * 1e3, decode_ms)


async def one_image(request: Request) -> None:
    """FastAPI would take the last of several ``image`` parts and drop the others unseen."""
    form = await request.form()  # parsed once: FastAPI reads the same cached form
    if len(form.getlist("image")) > 1:
        raise ApiError(400, "send one image part, not several")


def router(settings: ServiceSettings) -> APIRouter:
    Image = Annotated[UploadFile, File(description=f"query photo: {image_limits(settings)}")]
    K = Annotated[int | None, Form(ge=1, le=settings.max_k, description="results per list")]
    # the filter's text is matched against stored text: read strictly as UTF-8, as it was stored
    routes = APIRouter(
        prefix="/v1", tags=["search"], responses=SEARCH_ERRORS, route_class=Utf8FormRoute
    )
    body_limit = settings.max_search_request_bytes

    single = [Depends(one_image)]

    @routes.post("/search", response_model=SearchResponse, dependencies=single, description=(
        "Whole-image results plus item results for each detected garment position "
        f"(min_price <= max_price, else 400). The request body is at most {body_limit} bytes."
    ))  # fmt: skip
    def search(
        state: State,
        image: Image,
        k: K = None,
        position: Position = None,
        category: Category = None,
        min_price: Price = None,
        max_price: Price = None,
        detect: Annotated[bool, Form()] = True,
    ) -> SearchResponse:
        return run_search(state, image, k, ProductFilter(category or None, min_price, max_price),
                          detect=detect, position=check_position(position))  # fmt: skip

    @routes.post("/search/crop", response_model=SearchResponse, dependencies=single, description=(
        "Item results for one box: x1 < x2, y1 < y2 in query-image pixels, at least 8x8 "
        "pixels inside the image (else 400); min_price <= max_price. The request body is at "
        f"most {body_limit} bytes."
    ))  # fmt: skip
    def search_crop(
        state: State,
        image: Image,
        x1: Coord,
        y1: Coord,
        x2: Coord,
        y2: Coord,
        k: K = None,
        position: Position = None,
        category: Category = None,
        min_price: Price = None,
        max_price: Price = None,
    ) -> SearchResponse:
        if not (x2 > x1 and y2 > y1):
            raise ApiError(400, "the box needs x1 < x2 and y1 < y2")
        return run_search(state, image, k, ProductFilter(category or None, min_price, max_price),
                          box=Box(x1, y1, x2, y2), position=check_position(position))  # fmt: skip

    return routes
