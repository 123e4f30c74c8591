"""GET /v1/products/{id}/similar: more like this for a catalog product, from stored vectors."""

import time
from typing import Annotated

from fastapi import APIRouter, Query

from snapshop.catalog.fields import LIMITS
from snapshop.detect.base import POSITIONS
from snapshop.search import ProductFilter
from snapshop.service.convert import search_response
from snapshop.service.dependencies import State
from snapshop.service.errors import error_responses
from snapshop.service.routes.forms import check_position
from snapshop.service.schemas import SearchResponse
from snapshop.service.settings import ServiceSettings
from snapshop.service.state import ServiceState
from snapshop.similar import similar_products

PriceQuery = Annotated[float | None, Query(ge=0, allow_inf_nan=False)]


def run_similar(
    state: ServiceState, product_id: int, k: int | None, position: str | None,
    filters: ProductFilter,
) -> SearchResponse:  # fmt: skip
    """Under a search slot and the read lock: the service refreshes the catalog itself
    (``ensure_fresh``), so the library must not refresh it again outside the write lock."""
    start = time.perf_counter()
    with state.search_slot(), state.reading():
        product = state.catalog.get_product(product_id)  # 404 before any search
        result = similar_products(state.catalog, product.id, k or state.settings.default_k,
                                  position=position, filters=filters, refresh=False)  # fmt: skip
    return search_response(result, (time.perf_counter() - start) * 1e3)


def router(settings: ServiceSettings) -> APIRouter:
    routes = APIRouter(prefix="/v1/products", tags=["search"])

    @routes.get("/{product_id}/similar", response_model=SearchResponse,
                responses=error_responses(404, 422, 429), description=(
        "More like this: image-based results (from the product's image vectors) and item-"
        "based results (one list per garment position the product has crops at, from its crop "
        "vectors), the product itself excluded; nothing is re-embedded. `position` limits the "
        "results to that position's items (400 when the product has no crop there); "
        "min_price <= max_price, else 400. `query_size` is the product's first image's size "
        "and `detections` is empty."
    ))  # fmt: skip
    def similar(
        state: State,
        product_id: int,
        k: Annotated[int | None, Query(ge=1, le=settings.max_k,
                                       description="results per list")] = None,
        position: Annotated[str | None, Query(
            description="only item results at this position (upper or lower)",
            json_schema_extra={"enum": list(POSITIONS)})] = None,
        category: Annotated[str | None, Query(max_length=LIMITS.category,
                                              description="only this category")] = None,
        min_price: PriceQuery = None,
        max_price: PriceQuery = None,
    ) -> SearchResponse:  # fmt: skip
        filters = ProductFilter(category or None, min_price, max_price)
        return run_similar(state, product_id, k, check_position(position), filters)

    return routes
