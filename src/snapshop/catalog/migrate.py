"""Copy a catalog to another place (a directory to a PostgreSQL server and back) without
re-embedding: products, images, garment crops and their vectors, as they are.

Rows are copied a page of products at a time, one write transaction per page, and an image a
target product already holds (same content) is skipped, so an interrupted copy is resumed by
running it again. The image files go as the target keeps them: a server catalog stores a JPEG
thumbnail of each image (made from the directory's file), a directory stores files (a server
catalog has only thumbnails, so images copied back keep their ``source`` and no file).
Afterwards the counts of the source's products are compared, and a sample of vectors is
compared bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from snapshop.catalog.blobs import blob_file
from snapshop.catalog.catalog import Catalog, catalog_exists, create_catalog, open_catalog
from snapshop.catalog.server import SERVER_INDEX_KINDS, is_server_target, thumbnail_jpeg
from snapshop.catalog.store import ImageRow, NewCrop, Product
from snapshop.catalog.write import CatalogWrite
from snapshop.errors import CatalogError, FieldError, ImageDecodeError
from snapshop.images import load_image, stored_file_limits

log = logging.getLogger(__name__)

Target = str | os.PathLike[str]
PAGE = 200  # products per transaction
CHECK_SAMPLE = 200  # images whose vectors are compared after the copy


@dataclass(frozen=True)
class MigrateReport:
    source: str
    target: str
    products: int  # products of the source, all present in the target afterwards
    images_copied: int
    images_present: int  # already in the target (an earlier, interrupted run)
    crops_copied: int
    thumbnails: int  # thumbnails made for a server target
    images_without_file: int  # the source had no readable file for them
    vectors_checked: int
    seconds: float


def migrate_catalog(
    source: Target,
    target: Target,
    *,
    page: int = PAGE,
    progress: Callable[[int], None] | None = None,
) -> MigrateReport:
    """Copy catalog ``source`` into ``target`` (created like the source when absent; an
    existing one must have the same model). Raises CatalogError when the copy does not check
    out (counts or vectors differ)."""
    started = time.monotonic()
    with open_catalog(source) as src, _open_target(src, target) as dst:
        counts = {"copied": 0, "present": 0, "crops": 0, "thumbs": 0, "no_file": 0}
        after = 0
        while products := src.list_products(after_id=after, limit=page):
            after = products[-1].id
            with dst.writing() as write:
                for product in products:
                    _copy_product(src, dst, write, product, counts)
            dst.save_indexes(measure=False)
            if progress:
                progress(len(products))
        dst.save_indexes()
        checked = _check(src, dst)
    report = MigrateReport(
        source=src.location, target=dst.location, products=checked[0],
        images_copied=counts["copied"], images_present=counts["present"],
        crops_copied=counts["crops"], thumbnails=counts["thumbs"],
        images_without_file=counts["no_file"], vectors_checked=checked[1],
        seconds=round(time.monotonic() - started, 2),
    )  # fmt: skip
    log.info("migrated %s -> %s: %s", report.source, report.target, report)
    return report


def _open_target(src: Catalog, target: Target) -> Catalog:
    if catalog_exists(target):
        dst = open_catalog(target)
        if dst.model_id != src.model_id or dst.dim != src.dim:
            dst.close()
            raise CatalogError(
                f"{dst.location} holds vectors of model {dst.model_id} (dim {dst.dim}), the"
                f" source {src.model_id} (dim {src.dim}): they cannot share a catalog"
            )
        try:
            _check_existing_target(src, dst)
        except BaseException:
            dst.close()
            raise
        return dst
    kind = src.card.index_kind if not src.is_server else "auto"
    params = dict(src.card.index_params) if not src.is_server else None
    if is_server_target(target) and kind not in SERVER_INDEX_KINDS:
        params = None  # a directory's index parameters (a budget, faiss settings): not pgvector's
    dst = create_catalog(
        target, model_id=src.model_id, model_ref=src.model_ref, dim=src.dim, index_kind=kind,
        index_params=params,
    )  # fmt: skip
    dst.rewrite_card(
        crop_mode=src.crop_mode, detector=src.card.detector, catalog_views=src.catalog_views
    )
    return dst


def _check_existing_target(src: Catalog, dst: Catalog) -> None:
    """``dst`` may be an empty catalog or an earlier (interrupted) copy of ``src``, never
    another catalog: its products would be mixed with the source's, a shared sku overwritten."""
    foreign: list[str] = []
    after = 0
    while page := dst.list_products(after_id=after, limit=PAGE):
        after = page[-1].id
        foreign += [p.sku for p in page if src.find_product(p.sku) is None]
    if foreign:
        named = ", ".join(repr(sku) for sku in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CatalogError(
            f"{dst.location} holds {len(foreign)} products that {src.location} does not"
            f" ({named}):"
            " it is another catalog, not a copy of this one; migrate into a new or empty one"
            " (or remove those products from the target first)"
        )
    # Crops and views made another way would mix in one index with the source's.
    mine = (src.crop_mode, src.card.detector, src.catalog_views)
    theirs = (dst.crop_mode, dst.card.detector, dst.catalog_views)
    if dst.counts()["images"] == 0:
        # Nothing made another way yet: the card becomes the source's, a detector included
        # (a card without one, as a copy killed right after creating it left, would make
        # later searches and ingests skip garment detection).
        if mine != theirs:
            dst.rewrite_card(crop_mode=mine[0], detector=mine[1], catalog_views=mine[2])
        return
    differ = [f"{name} {a!r} here, {b!r} in the source"
              for name, b, a in zip(("crop_mode", "detector", "catalog_views"), mine, theirs,
                                    strict=True)
              if a != b and a is not None and b is not None]  # fmt: skip
    if differ:
        raise CatalogError(f"{dst.location} was built differently: {'; '.join(differ)}")


def _copy_product(
    src: Catalog, dst: Catalog, write: CatalogWrite, product: Product, counts: dict[str, int]
) -> None:
    fields = {"title": product.title, "url": product.url, "price": product.price,
              "currency": product.currency, "category": product.category,
              "attributes": product.attributes}  # fmt: skip
    try:
        product_id = write.upsert_product(product.sku, **fields)
    except FieldError as exc:
        raise CatalogError(
            f"product {product.sku!r} (id {product.id}) of {src.location} cannot be copied:"
            f" {exc}; correct it in the source (or remove it: snapshop catalog remove --catalog"
            f" SOURCE --id {product.id}), then run the migrate again to continue"
        ) from exc
    images = src.images_of(product.id)
    if not images:
        return
    vectors = _vectors(src, "images", [i.id for i in images])
    for image in images:
        if write.find_image(product_id, image.sha256) is not None:
            counts["present"] += 1
            continue
        crops = src.store.crops_of_image(image.id)
        crop_vectors = _vectors(src, "crops", [c.id for c in crops])
        new_crops = [
            NewCrop(c.position, c.label, c.score, c.box, crop_vectors[c.id]) for c in crops
        ]
        blob = _copy_file(src, dst, write, image, counts)
        write.insert_image(
            product_id, source=image.source, blob=blob, sha256=image.sha256, width=image.width,
            height=image.height, vector=vectors[image.id], crops=new_crops,
        )  # fmt: skip
        counts["copied"] += 1
        counts["crops"] += len(new_crops)


def _copy_file(
    src: Catalog, dst: Catalog, write: CatalogWrite, image: ImageRow, counts: dict[str, int]
) -> str | None:
    """What ``dst`` keeps of the image's file: a server's thumbnail, or a directory's blob
    (only a directory source has the file itself). Returns the row's ``blob`` value."""
    if src.is_server:
        if not dst.is_server:
            counts["no_file"] += 1
            return None
        found = src.store.get_blob(image.sha256)
        if found is None:
            counts["no_file"] += 1
        else:
            small = load_image(found[0])
            write.put_thumbnail(image.sha256, found[0], small.width, small.height)
        return None
    path = blob_file(src.directory, image.blob, image.sha256) if image.blob else None
    if path is None or not path.is_file():
        counts["no_file"] += 1
        return None
    if not dst.is_server:
        from snapshop.catalog.blobs import write_blob

        return write_blob(dst.blob_dir, image.sha256, path.read_bytes())
    try:
        pixels = load_image(path, stored_file_limits())
    except ImageDecodeError as exc:
        log.warning("image %s: stored file unreadable (%s); copied without it", image.id, exc)
        counts["no_file"] += 1
        return None
    data, width, height = thumbnail_jpeg(pixels)
    write.put_thumbnail(image.sha256, data, width, height)
    counts["thumbs"] += 1
    return None


def _vectors(catalog: Catalog, table: str, ids: list[int]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    if not ids:
        return out
    for batch_ids, vecs in catalog.store.iter_vectors(table, catalog.dim, ids=ids):
        out.update(zip(batch_ids.tolist(), vecs, strict=True))
    return out


def _check(src: Catalog, dst: Catalog) -> tuple[int, int]:
    """Every source product is in ``dst`` with all its images; a sample of images has as
    many crops and an identical vector. Returns (products checked, vectors compared)."""
    products = 0
    rng = np.random.default_rng(0)
    sample_rate = min(1.0, CHECK_SAMPLE / max(1, src.counts()["images"]))
    compared = 0
    after = 0
    while page := src.list_products(after_id=after, limit=PAGE):
        after = page[-1].id
        for product in page:
            copy = dst.find_product(product.sku)
            mine, theirs = src.images_of(product.id), [] if copy is None else dst.images_of(copy.id)
            by_sha = {image.sha256: image for image in theirs}
            if copy is None or any(image.sha256 not in by_sha for image in mine):
                raise CatalogError(f"migrate check: product {product.sku!r} incomplete in target")
            for image in mine:
                other = by_sha[image.sha256]
                if rng.random() < sample_rate:
                    n_src = len(src.store.crops_of_image(image.id))
                    n_dst = len(dst.store.crops_of_image(other.id))
                    if n_src != n_dst:
                        raise CatalogError(
                            f"migrate check: image {image.id}: {n_src} crops, copied {n_dst}"
                        )
                    a = _vectors(src, "images", [image.id])[image.id]
                    b = _vectors(dst, "images", [other.id])[other.id]
                    if not np.array_equal(a, b):
                        raise CatalogError(f"migrate check: vector of image {image.id} differs")
                    compared += 1
            products += 1
    return products, compared
