"""Pydantic request/response models of the HTTP API (they are the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from snapshop.catalog.fields import LIMITS


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a stable machine code and a sentence for people."""

    code: str = Field(description="machine-readable error code, e.g. unsupported_media_type")
    detail: str = Field(description="what went wrong and how to fix it")


class Health(BaseModel):
    status: str
    products: int
    images: int


class DetectionOut(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in query-image pixels")
    position: str | None = Field(description="garment position (upper / lower) or null")
    label: str = Field(description="detector class")
    score: float


class HitOut(BaseModel):
    product_id: int
    sku: str
    title: str | None
    price: float | None
    currency: str | None
    category: str | None
    url: str | None
    score: float = Field(
        description="the similarity the product was ranked by: image-based results, cosine with"
        " the product vector (mean of its images; with the service's ranking 'image', with its"
        " best image); item-based results and 'more like this', with the best image or crop"
    )
    image_id: int = Field(description="catalog image that matched best")
    crop_id: int | None = None
    crop_box: list[float] | None = Field(None, description="matched garment box in that image")
    image_url: str
    thumbnail_url: str
    crop_thumbnail_url: str | None = Field(
        None, description="JPEG of the matched garment crop (item results; null otherwise)"
    )


class ItemResultOut(BaseModel):
    position: str
    label: str
    score: float
    box: list[float]
    results: list[HitOut]


class SearchResponse(BaseModel):
    query_size: list[int] = Field(description="[width, height] of the decoded query image")
    detections: list[DetectionOut]
    image_results: list[HitOut]
    item_results: list[ItemResultOut]
    timings_ms: dict[str, float]


class ImageOut(BaseModel):
    id: int
    width: int
    height: int
    url: str
    thumbnail_url: str


class ProductOut(BaseModel):
    id: int
    sku: str
    title: str | None = None
    url: str | None = None
    price: float | None = None
    currency: str | None = None
    category: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    images: list[ImageOut] = Field(default_factory=list)


class ProductPage(BaseModel):
    items: list[ProductOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class ProductPatch(BaseModel):
    """Fields to change; omitted fields keep their value. Types are strict: ``"price": false``
    or ``"price": "3"`` is refused, not read as 0.0 or 3.0. Values are then checked by
    ``catalog.fields`` (control characters, attribute depth and size) like every other entry
    point's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    title: str | None = Field(None, max_length=LIMITS.title)
    url: str | None = Field(None, max_length=LIMITS.url)
    price: float | None = Field(None, ge=0, allow_inf_nan=False)
    currency: str | None = Field(None, max_length=LIMITS.currency)
    category: str | None = Field(None, max_length=LIMITS.category)
    attributes: dict[str, Any] | None = Field(
        None,
        description=f"merged into the product's attributes; the result at most"
        f" {LIMITS.attributes_chars} characters as compact JSON, nested at most"
        f" {LIMITS.attributes_depth} levels deep",
    )


class IngestFailure(BaseModel):
    source: str
    reason: str


class IngestOut(BaseModel):
    product: ProductOut
    created: bool
    added: int
    skipped: int
    crops: int
    failed: list[IngestFailure]
    warnings: list[str] = Field(
        default_factory=list, description="stored, but e.g. index files the disk refused"
    )


class DeleteOut(BaseModel):
    id: int
    sku: str
    images_removed: int
    warnings: list[str] = Field(
        default_factory=list, description="removed, but e.g. index files the disk refused"
    )


class StatsOut(BaseModel):
    products: int
    images: int
    crops: int
    index_kind: str
    indexes: dict[str, int]
    dim: int
    model_id: str
    model_card: dict[str, Any]
    detector: str | None
    generation: int
    limits: dict[str, Any]
