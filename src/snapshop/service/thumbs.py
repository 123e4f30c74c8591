"""Catalog image files and their cached thumbnails, addressed by catalog id only."""

from __future__ import annotations

import bisect
import logging
from pathlib import Path

from snapshop.catalog.blobs import THUMBNAILS, atomic_file
from snapshop.catalog.store import ImageRow
from snapshop.errors import ImageDecodeError, NotFoundError, StoredFileError
from snapshop.images import DecodeLimits, load_image, pil_pixel_ceiling

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


def thumbnail(catalog_dir: Path, image: ImageRow, size: int) -> Path:
    """JPEG thumbnail (longest side ``size``) cached in the catalog (``blobs.THUMBNAILS``)."""
    target = THUMBNAILS.file(catalog_dir, size, image.sha256)
    if target.is_file():
        return target
    source = blob_path(catalog_dir, image)
    # the file passed ingest's limits already; only PIL's own ceiling applies here
    largest = pil_pixel_ceiling() or 200_000_000
    try:
        pixels = load_image(source, DecodeLimits(max_pixels=largest, max_bytes=1 << 30))
    except ImageDecodeError as exc:  # our own file: the catalog's fault, not the caller's
        raise StoredFileError(str(source), exc.reason) from None
    pixels.thumbnail((size, size))
    with atomic_file(target) as fh:  # concurrent requests may both render, never tear
        pixels.save(fh, format="JPEG", quality=82, optimize=True)
    log.debug("thumbnail %s written", target)
    return target
