"""Catalog image files and their thumbnails (whole images and garment crops), addressed by
catalog id only.

A catalog directory keeps each image's file, and thumbnails rendered from it are cached
beside (``blobs.THUMBNAILS``): the functions return a path. A server catalog keeps one JPEG
thumbnail per image in the database (``catalog.server``): they render from it in memory and
return the JPEG bytes, since a replica has no disk of the catalog's to cache on."""

from __future__ import annotations

import bisect
import io
import logging
import math
from pathlib import Path

from fastapi.responses import FileResponse, Response
from PIL import Image

from snapshop.catalog.blobs import CROP_THUMBNAILS, THUMBNAILS
from snapshop.catalog.catalog import Catalog
from snapshop.catalog.store import CropRow, ImageRow
from snapshop.config import atomic_file
from snapshop.errors import ImageDecodeError, NotFoundError, StoredFileError
from snapshop.images import DecodeLimits, load_image, stored_file_limits

log = logging.getLogger(__name__)


def snap_size(requested: int | None, sizes: tuple[int, ...]) -> int:
    """The smallest allowed size >= ``requested`` (the largest one when it is bigger);
    ``None`` -> the middle size. Keeps the cache to a handful of files per image."""
    if requested is None:
        return sizes[len(sizes) // 2]
    i = bisect.bisect_left(sizes, max(1, requested))
    return sizes[min(i, len(sizes) - 1)]


def blob_path(catalog_dir: Path, image: ImageRow) -> Path:
    """The stored file of ``image``, guaranteed to lie inside the catalog directory."""
    if not image.blob:
        raise NotFoundError(f"no stored file for image {image.id}")
    root = catalog_dir.resolve()
    path = (root / image.blob).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFoundError(f"no stored file for image {image.id}")
    return path


Rendered = Path | bytes  # a cached file, or JPEG bytes rendered for this request


def thumbnail(catalog: Catalog, image: ImageRow, size: int) -> Rendered:
    """JPEG thumbnail (longest side ``size``), cached in a catalog directory."""
    if catalog.is_server:
        pixels, _ = _server_pixels(catalog, image)
        pixels.thumbnail((size, size), Image.Resampling.LANCZOS)
        return _jpeg_bytes(pixels)
    target = THUMBNAILS.file(catalog.directory, size, image.sha256)
    if target.is_file():
        return target
    pixels = _stored_pixels(catalog.directory, image)
    pixels.thumbnail((size, size))
    return _save_jpeg(pixels, target)


def original(catalog: Catalog, image: ImageRow) -> tuple[Rendered, str | None]:
    """The stored image (a server catalog stores its thumbnail only) and its media type
    (None: tell it by the file name)."""
    if catalog.is_server:
        return catalog.stored_thumbnail(image)
    return blob_path(catalog.directory, image), None


Pixels = tuple[int, int, int, int]


def crop_pixels(crop: CropRow, image: ImageRow) -> Pixels:
    """The crop's box as whole pixels of its image: rounded outwards, clamped to the image.

    A stored box that leaves nothing inside the image (not one ingest writes) is a
    NotFoundError: there is no crop to show.
    """
    x1, y1, x2, y2 = crop.box
    if not all(math.isfinite(v) for v in crop.box):
        raise NotFoundError(f"crop {crop.id} has no usable box")
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(image.width, math.ceil(x2)), min(image.height, math.ceil(y2))
    if right - left < 1 or bottom - top < 1:
        raise NotFoundError(f"crop {crop.id} has no usable box inside image {image.id}")
    return left, top, right, bottom


def crop_thumbnail(catalog: Catalog, image: ImageRow, box: Pixels, size: int) -> Rendered:
    """JPEG of ``box`` (from :func:`crop_pixels`) of ``image``, longest side at most ``size``,
    cached in a catalog directory (``blobs.CROP_THUMBNAILS``). Named by the image's content
    and the box, so a cached file can never show another crop than the one asked for."""
    if catalog.is_server:
        pixels, scale = _server_pixels(catalog, image)
        left, top, right, bottom = (round(v * scale) for v in box)
        part = pixels.crop((left, top, max(right, left + 1), max(bottom, top + 1)))
        part.thumbnail((size, size), Image.Resampling.LANCZOS)
        return _jpeg_bytes(part)
    catalog_dir = catalog.directory
    target = CROP_THUMBNAILS.file(catalog_dir, size, image.sha256, tag="_".join(map(str, box)))
    if target.is_file():
        return target
    pixels = _stored_pixels(catalog_dir, image)
    # ingest stores boxes in the decoded image's pixels; a file that decodes to another size
    # than its row says cannot be cropped by them
    if pixels.size != (image.width, image.height):
        raise StoredFileError(str(blob_path(catalog_dir, image)), "size differs from the catalog")
    part = pixels.crop(box)
    part.thumbnail((size, size), Image.Resampling.LANCZOS)
    return _save_jpeg(part, target)


def _server_pixels(catalog: Catalog, image: ImageRow) -> tuple[Image.Image, float]:
    """The server catalog's stored thumbnail of ``image``, decoded, and its scale to the
    image's own pixels (boxes are stored in those)."""
    data, _ = catalog.stored_thumbnail(image)
    try:
        pixels = load_image(data, DecodeLimits(max_pixels=4_000_000, max_bytes=1 << 24))
    except ImageDecodeError as exc:  # our own row: the catalog's fault, not the caller's
        where = f"{catalog.location} thumbnail of image {image.id}"
        raise StoredFileError(where, exc.reason) from None
    return pixels, pixels.width / max(1, image.width)


def _stored_pixels(catalog_dir: Path, image: ImageRow) -> Image.Image:
    source = blob_path(catalog_dir, image)
    try:
        return load_image(source, stored_file_limits())
    except ImageDecodeError as exc:  # our own file: the catalog's fault, not the caller's
        raise StoredFileError(str(source), exc.reason) from None


def image_response(body: Rendered, media_type: str, headers: dict[str, str]) -> Response:
    """The HTTP response for a rendered image: the cached file, or the bytes."""
    if isinstance(body, Path):
        return FileResponse(body, media_type=media_type, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def _jpeg_bytes(pixels: Image.Image) -> bytes:
    out = io.BytesIO()
    pixels.save(out, format="JPEG", quality=82, optimize=True)
    return out.getvalue()


def _save_jpeg(pixels: Image.Image, target: Path) -> Rendered:
    """The thumbnail cached in ``target``; its bytes alone when the cache cannot be written
    (a full disk, a read-only catalog): a cache must not turn a read into a failure."""
    data = _jpeg_bytes(pixels)
    try:
        with atomic_file(target) as fh:  # concurrent requests may both render, never tear
            fh.write(data)
    except OSError as exc:
        log.warning("thumbnail %s not cached (%s)", target, exc)
        return data
    log.debug("thumbnail %s written", target)
    return target
