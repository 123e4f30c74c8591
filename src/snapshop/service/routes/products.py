"""/v1/products: list, read, add (with images), change and delete products."""

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from snapshop.catalog.fields import LIMITS, check_product_fields, is_blank, parse_attributes
from snapshop.data.sources import CatalogRecord
from snapshop.images import DecodeLimits
from snapshop.service.convert import decode_cursor, encode_cursor, product_out
from snapshop.service.dependencies import State, require_key
from snapshop.service.errors import ApiError, error_responses
from snapshop.service.routes.forms import Category, Price, Utf8FormRoute, image_limits
from snapshop.service.schemas import (
    DeleteOut,
    IngestFailure,
    IngestOut,
    ProductOut,
    ProductPage,
    ProductPatch,
)
from snapshop.service.settings import ServiceSettings
from snapshop.service.state import ServiceState
from snapshop.service.uploads import decode_upload, read_bounded

WRITE_ERRORS = error_responses(401, 403, 422, 503)
# An empty PATCH is a 400 ("nothing to change"): say so in the body's schema.
AT_LEAST_ONE_FIELD = {
    "requestBody": {"content": {"application/json": {"schema": {"minProperties": 1}}}}
}


def add_product(
    state: ServiceState,
    sku: str,
    uploads: list[UploadFile],
    meta: dict[str, Any],
    packshot: bool,
) -> IngestOut:
    """Validate every upload, then ingest them all (nothing is written when one is bad)."""
    settings = state.settings
    sku = sku.strip()
    if is_blank(sku):
        raise ApiError(400, "sku must not be blank")
    if len(uploads) > settings.max_images_per_product:
        raise ApiError(413, f"at most {settings.max_images_per_product} images per request")
    limits = DecodeLimits(max_pixels=settings.max_pixels, max_bytes=settings.max_upload_bytes)
    records = []
    for n, upload in enumerate(uploads):
        name = f"image {n + 1} ({(upload.filename or 'unnamed')[:80]})"
        data = read_bounded(upload.file, settings.max_upload_bytes, name)
        decode_upload(data, limits, name)
        records.append(CatalogRecord(sku, Path("upload") / (upload.filename or f"{n}"),
                                     meta, data=data, packshot=packshot))  # fmt: skip
    catalog = state.catalog
    report = state.ingest(records)
    product = catalog.find_product(sku)
    if product is None and (report.added or report.skipped):  # a delete came in between
        raise ApiError(409, f"product {sku!r} was stored, then deleted by another request"
                       " before this answer: send the upload again to add it back")  # fmt: skip
    if product is None:  # every image failed after validation (should not happen)
        reasons = "; ".join(f"{source}: {reason}" for source, reason in report.failed)
        raise ApiError(400, f"no image could be ingested ({reasons or 'no reason given'})")
    return IngestOut(
        product=product_out(product, catalog.images_of(product.id)),
        created=product.id in report.created,
        added=report.added, skipped=report.skipped, crops=report.crops,
        failed=[IngestFailure(source=s, reason=r) for s, r in report.failed],
        warnings=report.warnings,
    )  # fmt: skip


def router(settings: ServiceSettings) -> APIRouter:
    """The product routes. They are defined inside this function because their parameter
    limits (page size) come from ``settings`` and FastAPI reads limits from the annotations
    when a route is declared; each route body is a call or two into the library."""
    routes = APIRouter(prefix="/v1/products", tags=["products"], route_class=Utf8FormRoute)
    Limit = Annotated[int | None, Query(ge=1, le=settings.max_page_limit)]
    writes: dict[str, Any] = {"dependencies": [Depends(require_key)]}

    @routes.get("", response_model=ProductPage, responses=error_responses(422))
    def list_products(
        state: State,
        category: Annotated[str | None, Query(max_length=200)] = None,
        limit: Limit = None,
        cursor: Annotated[str | None, Query(max_length=64, description=(
            "next_cursor of the previous page (opaque; anything else is a 400)"))] = None,
    ) -> ProductPage:  # fmt: skip
        """Products in id order, ``limit`` per page; follow ``next_cursor`` for more."""
        after = decode_cursor(cursor) if cursor else 0
        size = limit or state.settings.page_limit
        catalog = state.catalog
        rows = catalog.list_products(category or None, after_id=after, limit=size + 1)
        page = rows[:size]
        return ProductPage(
            items=[product_out(p, catalog.images_of(p.id)) for p in page],
            next_cursor=encode_cursor(page[-1].id) if len(rows) > size else None,
        )

    @routes.get("/{product_id}", response_model=ProductOut, responses=error_responses(404, 422))
    def get_product(state: State, product_id: int) -> ProductOut:
        catalog = state.catalog
        product = catalog.get_product(product_id)
        return product_out(product, catalog.images_of(product.id))

    @routes.post("", response_model=IngestOut, status_code=201, responses={
        200: {"model": IngestOut, "description": "Images added to an existing product"},
        **WRITE_ERRORS, **error_responses(409, 415)}, description=(
        "Add a product with its images, or add images to an existing sku (incremental). "
        f"Images: {image_limits(settings)}; at most {settings.max_images_per_product} per "
        f"request; the request body is at most {settings.max_request_bytes} bytes."
    ), **writes)  # fmt: skip
    def add(
        state: State,
        response: Response,
        sku: Annotated[str, Form(min_length=1, max_length=LIMITS.sku, description="product id")],
        images: Annotated[list[UploadFile], File(
            description="one or more product photos",
            json_schema_extra={"minItems": 1, "maxItems": settings.max_images_per_product})],
        title: Annotated[str | None, Form(max_length=LIMITS.title)] = None,
        url: Annotated[str | None, Form(max_length=LIMITS.url)] = None,
        price: Price = None,
        currency: Annotated[str | None, Form(max_length=LIMITS.currency)] = None,
        category: Category = None,
        attributes: Annotated[
            str | None, Form(max_length=LIMITS.attributes_chars, description=f"JSON object, "
                             f"nested at most {LIMITS.attributes_depth} levels deep")
        ] = None,
        packshot: Annotated[
            bool, Form(description="the photos show the product alone, no model wearing it")
        ] = False,
    ) -> IngestOut:  # fmt: skip
        given = check_product_fields({"title": title, "url": url, "price": price,
                                      "currency": currency, "category": category})  # fmt: skip
        # a form field left blank is one not sent: it keeps the stored value
        meta: dict[str, Any] = {k: v for k, v in given.items() if v is not None and v != ""}
        if attributes:  # bounded before parsing: no text makes json recurse or overflow
            meta["attributes"] = parse_attributes(attributes)
        result = add_product(state, sku, images, meta, packshot)
        if not result.created:
            response.status_code = 200
        return result

    @routes.patch("/{product_id}", response_model=ProductOut,
                  responses={**WRITE_ERRORS, **error_responses(404)},
                  openapi_extra=AT_LEAST_ONE_FIELD, **writes)  # fmt: skip
    def patch_product(state: State, product_id: int, patch: ProductPatch) -> ProductOut:
        fields = patch.model_dump(exclude_unset=True, exclude_none=True)
        if not fields:
            raise ApiError(400, "nothing to change: send at least one of "
                           + ", ".join(ProductPatch.model_fields))  # fmt: skip
        catalog = state.catalog
        product = catalog.update_product(product_id, **fields)
        return product_out(product, catalog.images_of(product.id))

    @routes.delete("/{product_id}", response_model=DeleteOut,
                   responses={**WRITE_ERRORS, **error_responses(404)}, **writes)  # fmt: skip
    def delete_product(state: State, product_id: int) -> DeleteOut:
        product = state.catalog.get_product(product_id)
        removed, warnings = state.remove_product(product_id)
        return DeleteOut(id=product.id, sku=product.sku, images_removed=removed, warnings=warnings)

    return routes
