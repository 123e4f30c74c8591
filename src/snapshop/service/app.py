"""The FastAPI application: ``create_app(settings)`` with every route under ``/v1``.

Endpoints are plain ``def`` functions, so FastAPI runs them in its thread pool and the
CPU-bound work (decode, detect, embed) never blocks the event loop.

No ``from __future__ import annotations`` here: the form-field aliases (``K``, ``Price``...)
are built inside ``create_app`` from the settings, and FastAPI must see them evaluated.
"""

import base64
import binascii
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from snapshop.catalog.store import ImageRow, Product
from snapshop.data.sources import CatalogRecord
from snapshop.detect.base import POSITIONS, Box, Detector
from snapshop.images import DecodeLimits
from snapshop.search import ProductFilter, ProductHit, Searcher, SearchResult
from snapshop.service.errors import ApiError, error_response, install_error_handlers
from snapshop.service.schemas import (
    DeleteOut,
    DetectionOut,
    ErrorBody,
    Health,
    HitOut,
    ImageOut,
    IngestFailure,
    IngestOut,
    ItemResultOut,
    ProductOut,
    ProductPage,
    ProductPatch,
    SearchResponse,
    StatsOut,
)
from snapshop.service.settings import ServiceSettings
from snapshop.service.state import ServiceState
from snapshop.service.thumbs import blob_path, snap_size, thumbnail
from snapshop.service.uploads import decode_upload, read_bounded

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff"}  # fmt: skip
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                ".html": "text/html", ".png": "image/png"}  # fmt: skip
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 429)
}
MAX_TEXT = 2000


def _image_urls(image_id: int) -> tuple[str, str]:
    return f"/v1/images/{image_id}", f"/v1/images/{image_id}/thumb?size=256"


def _hit(h: ProductHit) -> HitOut:
    url, thumb = _image_urls(h.image_id)
    return HitOut(
        product_id=h.product_id, sku=h.sku, title=h.title, price=h.price, currency=h.currency,
        category=h.category, url=h.url, score=round(h.score, 5), image_id=h.image_id,
        crop_id=h.crop_id, crop_box=list(h.crop_box) if h.crop_box else None, image_url=url,
        thumbnail_url=thumb,
    )  # fmt: skip


def _search_response(result: SearchResult, request_ms: float, decode_ms: float) -> SearchResponse:
    return SearchResponse(
        query_size=list(result.query_size),
        detections=[
            DetectionOut(
                box=[round(v, 2) for v in d.box.as_tuple()],
                position=d.position,
                label=d.label,
                score=round(d.score, 4),
            )  # fmt: skip
            for d in result.detections
        ],
        image_results=[_hit(h) for h in result.image_results],
        item_results=[
            ItemResultOut(
                position=r.position,
                label=r.label,
                score=round(r.score, 4),
                box=[round(v, 2) for v in r.box],
                results=[_hit(h) for h in r.results],
            )  # fmt: skip
            for r in result.item_results
        ],
        timings_ms={
            **{k: round(v, 2) for k, v in result.timings_ms.items()},
            "decode": round(decode_ms, 2),  # the upload, decoded before the searcher sees it
            "request": round(request_ms, 2),
        },
    )


def _image_out(image: ImageRow) -> ImageOut:
    url, thumb = _image_urls(image.id)
    return ImageOut(id=image.id, width=image.width, height=image.height, url=url,
                    thumbnail_url=thumb)  # fmt: skip


def _product_out(product: Product, images: list[ImageRow]) -> ProductOut:
    return ProductOut(
        id=product.id, sku=product.sku, title=product.title, url=product.url,
        price=product.price, currency=product.currency, category=product.category,
        attributes=product.attributes, created_at=product.created_at,
        updated_at=product.updated_at, images=[_image_out(i) for i in images],
    )  # fmt: skip


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"p{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("p") or not raw[1:].isdigit():
            raise ValueError(raw)
        return int(raw[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid cursor: pass the next_cursor of a previous page") from None


def _filters(
    category: str | None, min_price: float | None, max_price: float | None
) -> ProductFilter:
    return ProductFilter(category or None, min_price, max_price)


def _check_position(position: str | None) -> str | None:
    if position in (None, ""):
        return None
    if position not in POSITIONS:
        raise ApiError(400, f"position must be one of {list(POSITIONS)}, got {position!r}")
    return position


def _open_searcher(settings: ServiceSettings, detector: Detector | None) -> Searcher:
    from snapshop.catalog.catalog import open_catalog
    from snapshop.detect.factory import create_detector
    from snapshop.models.embedder import load_embedder

    catalog = open_catalog(settings.catalog_dir)
    try:
        threads = {"threads": settings.embed_threads} if settings.embed_threads else {}
        embedder = load_embedder(settings.model or catalog.model_ref, **threads)
        # No detector setting: use the one the catalog's crops came from.
        spec = settings.detector if settings.detector is not None else catalog.detector
        det = detector if detector is not None else create_detector(spec)
        return Searcher(catalog, embedder, det)  # checks the catalog's model id
    except BaseException:
        catalog.close()
        raise


def _install_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the ``swagger-ui-bundle`` package, not a CDN (closed networks)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    try:
        import swagger_ui_bundle
    except ImportError:  # pragma: no cover - the dependency is declared
        return
    app.mount(
        "/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), "docs-assets"
    )

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="snapshop API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def create_app(
    settings: ServiceSettings,
    *,
    searcher: Searcher | None = None,
    detector: Detector | None = None,
) -> FastAPI:
    """The snapshop HTTP service over ``settings.catalog_dir``.

    ``searcher`` (tests, embedding apps) replaces opening the catalog; ``detector`` replaces
    ``settings.detector``. The app closes the catalog it opened on shutdown.
    """
    owned = searcher is None
    state = ServiceState(settings, searcher or _open_searcher(settings, detector))
    limits = DecodeLimits(max_pixels=settings.max_pixels, max_bytes=settings.max_upload_bytes)
    catalog = state.catalog
    store = catalog.store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            catalog.close()

    app = FastAPI(
        lifespan=lifespan,
        title="snapshop",
        version="1",
        summary="Visual search for e-commerce: photograph a product, find similar ones.",
        responses=ERRORS,
        docs_url=None,
    )
    app.state.snapshop = state
    install_error_handlers(app)
    _install_offline_docs(app)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid Content-Length header")
            if int(length) > settings.max_request_bytes:
                return error_response(
                    413, f"request body is {length} bytes, limit is {settings.max_request_bytes}"
                )
        return await call_next(request)

    def require_key(
        x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
    ) -> None:
        if settings.api_key is None:
            raise ApiError(403, "writes are disabled: the service was started without an API key",
                           "writes_disabled")  # fmt: skip
        if not x_api_key:
            raise ApiError(401, "missing X-API-Key header", headers={"WWW-Authenticate": "ApiKey"})
        if not hmac.compare_digest(x_api_key.encode(), settings.api_key.encode()):
            raise ApiError(403, "wrong API key")

    v1 = APIRouter(prefix="/v1")
    K = Annotated[int | None, Form(ge=1, le=settings.max_k, description="results per list")]
    Category = Annotated[str | None, Form(max_length=200)]
    Price = Annotated[float | None, Form(ge=0, allow_inf_nan=False)]
    Position = Annotated[str | None, Form(description="upper or lower")]
    Coord = Annotated[float, Form(allow_inf_nan=False)]

    def run_search(
        upload: UploadFile, k: int | None, filters: ProductFilter, **kwargs: Any
    ) -> SearchResponse:
        start = time.perf_counter()
        with state.search_slot():
            data = read_bounded(upload.file, settings.max_upload_bytes)
            pixels = decode_upload(data, limits)
            decode_ms = (time.perf_counter() - start) * 1e3
            with state.reading():
                result = state.searcher.search(
                    pixels, k or settings.default_k, filters=filters, **kwargs
                )
        return _search_response(result, (time.perf_counter() - start) * 1e3, decode_ms)

    @v1.post("/search", response_model=SearchResponse, tags=["search"])
    def search(
        image: Annotated[UploadFile, File(description="query photo")],
        k: K = None,
        position: Position = None,
        category: Category = None,
        min_price: Price = None,
        max_price: Price = None,
        detect: Annotated[bool, Form()] = True,
    ) -> SearchResponse:
        """Whole-image results plus item results for each detected garment position."""
        return run_search(image, k, _filters(category, min_price, max_price),
                          detect=detect, position=_check_position(position))  # fmt: skip

    @v1.post("/search/crop", response_model=SearchResponse, tags=["search"])
    def search_crop(
        image: Annotated[UploadFile, File(description="query photo")],
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
        """Item results for one box (x1 < x2, y1 < y2, in query-image pixels)."""
        if not (x2 > x1 and y2 > y1):
            raise ApiError(400, "the box needs x1 < x2 and y1 < y2")
        return run_search(image, k, _filters(category, min_price, max_price),
                          box=Box(x1, y1, x2, y2), position=_check_position(position))  # fmt: skip

    @v1.get("/products", response_model=ProductPage, tags=["products"])
    def list_products(
        category: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int | None, Query(ge=1, le=settings.max_page_limit)] = None,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> ProductPage:
        """Products in id order, ``limit`` per page; follow ``next_cursor`` for more."""
        after = decode_cursor(cursor) if cursor else 0
        size = limit or settings.page_limit
        rows = store.list_products(category or None, after_id=after, limit=size + 1)
        page = rows[:size]
        return ProductPage(
            items=[_product_out(p, store.images_of(p.id)) for p in page],
            next_cursor=encode_cursor(page[-1].id) if len(rows) > size else None,
        )

    @v1.get("/products/{product_id}", response_model=ProductOut, tags=["products"])
    def get_product(product_id: int) -> ProductOut:
        product = store.get_product(product_id)
        return _product_out(product, store.images_of(product.id))

    @v1.post("/products", response_model=IngestOut, status_code=201, tags=["products"],
             dependencies=[Depends(require_key)])  # fmt: skip
    def add_product(
        response: Response,
        sku: Annotated[str, Form(min_length=1, max_length=200, description="product id")],
        images: Annotated[list[UploadFile], File(description="one or more product photos")],
        title: Annotated[str | None, Form(max_length=500)] = None,
        url: Annotated[str | None, Form(max_length=MAX_TEXT)] = None,
        price: Price = None,
        currency: Annotated[str | None, Form(max_length=8)] = None,
        category: Category = None,
        attributes: Annotated[
            str | None, Form(max_length=20_000, description="JSON object")
        ] = None,
        packshot: Annotated[
            bool, Form(description="the photos show the product alone, no model wearing it")
        ] = False,
    ) -> IngestOut:
        """Add a product with its images, or add images to an existing sku (incremental)."""
        sku = sku.strip()
        if not sku:
            raise ApiError(400, "sku must not be blank")
        if len(images) > settings.max_images_per_product:
            raise ApiError(413, f"at most {settings.max_images_per_product} images per request")
        given = {"title": title, "url": url, "price": price, "currency": currency,
                 "category": category}  # fmt: skip
        meta: dict[str, Any] = {k: v for k, v in given.items() if v is not None and v != ""}
        if attributes:
            try:
                attrs = json.loads(attributes)
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"attributes is not valid JSON ({exc.msg})") from None
            if not isinstance(attrs, dict):
                raise ApiError(400, "attributes must be a JSON object")
            meta["attributes"] = attrs
        records = []
        for n, upload in enumerate(images):  # validate everything before writing anything
            name = f"image {n + 1} ({(upload.filename or 'unnamed')[:80]})"
            data = read_bounded(upload.file, settings.max_upload_bytes, name)
            decode_upload(data, limits, name)
            records.append(CatalogRecord(sku, Path("upload") / (upload.filename or f"{n}"),
                                         meta, data=data, packshot=packshot))  # fmt: skip
        created = store.find_product(sku) is None
        report = state.ingest(records)
        product = store.find_product(sku)
        if product is None:  # every image failed after validation (should not happen)
            raise ApiError(400, "no image could be ingested")
        if not created:
            response.status_code = 200
        return IngestOut(
            product=_product_out(product, store.images_of(product.id)), created=created,
            added=report.added, skipped=report.skipped, crops=report.crops,
            failed=[IngestFailure(source=s, reason=r) for s, r in report.failed],
        )  # fmt: skip

    @v1.patch("/products/{product_id}", response_model=ProductOut, tags=["products"],
              dependencies=[Depends(require_key)])  # fmt: skip
    def patch_product(product_id: int, patch: ProductPatch) -> ProductOut:
        fields = patch.model_dump(exclude_unset=True, exclude_none=True)
        if not fields:
            raise ApiError(400, "nothing to change: send at least one of "
                           + ", ".join(ProductPatch.model_fields))  # fmt: skip
        product = store.update_product(product_id, **fields)
        return _product_out(product, store.images_of(product.id))

    @v1.delete("/products/{product_id}", response_model=DeleteOut, tags=["products"],
               dependencies=[Depends(require_key)])  # fmt: skip
    def delete_product(product_id: int) -> DeleteOut:
        product = store.get_product(product_id)
        removed = state.remove_product(product_id)
        return DeleteOut(id=product.id, sku=product.sku, images_removed=removed)

    def _image_headers(image: ImageRow) -> dict[str, str]:
        return {"ETag": f'"{image.sha256}"', "Cache-Control": "public, max-age=86400"}

    @v1.get("/images/{image_id}", tags=["images"], response_class=FileResponse)
    def get_image(image_id: int) -> FileResponse:
        """The stored catalog image (by catalog id only)."""
        image = store.get_image(image_id)
        path = blob_path(catalog.directory, image)
        media = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media, headers=_image_headers(image))

    @v1.get("/images/{image_id}/thumb", tags=["images"], response_class=FileResponse)
    def get_thumb(
        image_id: int,
        size: Annotated[int | None, Query(ge=1, le=100_000, description="longest side")] = None,
    ) -> FileResponse:
        """JPEG thumbnail; ``size`` snaps up to one of the allowed sizes (cached on disk)."""
        image = store.get_image(image_id)
        path = thumbnail(catalog.directory, image, snap_size(size, settings.thumb_sizes))
        return FileResponse(path, media_type="image/jpeg", headers=_image_headers(image))

    @v1.get("/stats", response_model=StatsOut, tags=["service"])
    def stats() -> StatsOut:
        info = catalog.info()
        return StatsOut(
            products=info["products"], images=info["images"], crops=info["crops"],
            index_kind=info["index_kind"], indexes=info["indexes"], dim=info["dim"],
            model_id=info["model_id"], model_card=state.searcher.embedder.card.to_dict(),
            detector=state.detector_name, generation=info["generation"],
            limits={"max_upload_bytes": settings.max_upload_bytes,
                    "max_pixels": settings.max_pixels, "max_k": settings.max_k,
                    "max_images_per_product": settings.max_images_per_product,
                    "thumb_sizes": list(settings.thumb_sizes),
                    "writes_enabled": settings.writes_enabled},
        )  # fmt: skip

    app.include_router(v1)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        counts = store.counts()
        return Health(status="ok", products=counts["products"], images=counts["images"])

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})  # fmt: skip

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> FileResponse:
        allowed = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
        if name not in allowed:
            raise ApiError(404, f"no static file {name!r}")
        media = STATIC_TYPES.get(allowed[name].suffix, "application/octet-stream")
        return FileResponse(allowed[name], media_type=media, headers={"Cache-Control": "no-cache"})

    return app


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000,
          detector: Detector | None = None) -> None:  # fmt: skip
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    app = create_app(settings, detector=detector)
    log.info("serving %s on http://%s:%d", settings.catalog_dir, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["create_app", "serve", "JSONResponse"]
