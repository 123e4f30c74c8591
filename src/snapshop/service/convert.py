"""From library results to the API's response models, and the opaque page cursor."""

from __future__ import annotations

import base64
import binascii

from snapshop.catalog.store import ImageRow, Product
from snapshop.search import ProductHit, SearchResult
from snapshop.service.errors import ApiError
from snapshop.service.schemas import (
    DetectionOut,
    HitOut,
    ImageOut,
    ItemResultOut,
    ProductOut,
    SearchResponse,
)


def image_urls(image_id: int) -> tuple[str, str]:
    return f"/v1/images/{image_id}", f"/v1/images/{image_id}/thumb?size=256"


def crop_thumbnail_url(crop_id: int) -> str:
    return f"/v1/crops/{crop_id}/thumb?size=256"


def hit_out(h: ProductHit) -> HitOut:
    url, thumb = image_urls(h.image_id)
    crop_thumb = crop_thumbnail_url(h.crop_id) if h.crop_id is not None else None
    return HitOut(
        product_id=h.product_id, sku=h.sku, title=h.title, price=h.price, currency=h.currency,
        category=h.category, url=h.url, score=round(h.score, 5), image_id=h.image_id,
        crop_id=h.crop_id, crop_box=list(h.crop_box) if h.crop_box else None, image_url=url,
        thumbnail_url=thumb, crop_thumbnail_url=crop_thumb,
    )  # fmt: skip


def search_response(
    result: SearchResult, request_ms: float, decode_ms: float | None = None
) -> SearchResponse:
    """``decode_ms``: time spent decoding an upload (None: the request had no image)."""
    decode = {} if decode_ms is None else {"decode": round(decode_ms, 2)}
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
        image_results=[hit_out(h) for h in result.image_results],
        item_results=[
            ItemResultOut(
                position=r.position,
                label=r.label,
                score=round(r.score, 4),
                box=[round(v, 2) for v in r.box],
                results=[hit_out(h) for h in r.results],
            )  # fmt: skip
            for r in result.item_results
        ],
        timings_ms={
            **{k: round(v, 2) for k, v in result.timings_ms.items()},
            **decode,  # the upload, decoded before the searcher sees it
            "request": round(request_ms, 2),
        },
    )


def image_out(image: ImageRow) -> ImageOut:
    url, thumb = image_urls(image.id)
    return ImageOut(id=image.id, width=image.width, height=image.height, url=url,
                    thumbnail_url=thumb)  # fmt: skip


def product_out(product: Product, images: list[ImageRow]) -> ProductOut:
    return ProductOut(
        id=product.id, sku=product.sku, title=product.title, url=product.url,
        price=product.price, currency=product.currency, category=product.category,
        attributes=product.attributes, created_at=product.created_at,
        updated_at=product.updated_at, images=[image_out(i) for i in images],
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
