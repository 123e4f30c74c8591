"""Copy a catalog to another place (a directory to a PostgreSQL server and back) without
re-embedding: products, images, garment crops and their vectors, as they are.

Rows are copied a page of products at a time, one write transaction per page, and an image a
target product already holds (same content, vectors and crops) is skipped, so an interrupted
copy is resumed by running it again. Both sides of a page are read in a few queries (images,
crops and their vectors), not a few per image. The image files go as the target keeps them: a server
catalog stores a JPEG thumbnail of each image (made from the directory's file, or copied from
another server), a directory stores files (a server catalog has only thumbnails, so images
copied back keep their ``source`` and no file).

A target may be empty or a copy of the source (made by an earlier run, perhaps long ago), never
another catalog. Copies are told apart by the card's ``catalog_id``: the source is given one
at its first migrate, and every copy carries it. Run onto an older copy, the source wins for
what both hold (fields overwritten; an image the source re-embedded or re-detected replaced)
and what only the target holds is counted and kept; with ``mirror`` it is removed too, and the
target ends equal to the source. Rows that did not change keep their ids either way.

Afterwards the counts of the source's products are compared (with ``mirror``, all counts), and
a sample of vectors is compared bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from snapshop.catalog.blobs import blob_file, free_unreferenced_blobs
from snapshop.catalog.catalog import (
    CARD_FILE,
    Catalog,
    catalog_exists,
    create_catalog,
    open_catalog,
)
from snapshop.catalog.fields import attributes_json, lookup_sku
from snapshop.catalog.server import SERVER_INDEX_KINDS, is_server_target, thumbnail_jpeg
from snapshop.catalog.store import PRODUCT_FIELDS, CropRow, ImageRow, NewCrop, Product, now
from snapshop.catalog.write import CatalogWrite
from snapshop.errors import CatalogError, FieldError, ImageDecodeError
from snapshop.images import load_image, stored_file_limits

log = logging.getLogger(__name__)

Target = str | os.PathLike[str]
PAGE = 200  # products per transaction
CHECK_SAMPLE = 200  # images whose vectors are compared after the copy
CATALOG_ID = "catalog_id"  # card key: one catalog and every copy migrate made of it

BlobRefs = list[tuple[str, str | None]]  # (sha256, blob) of deleted image rows


@dataclass(frozen=True)
class MigrateReport:
    source: str
    target: str
    products: int  # products of the source, all present in the target afterwards
    images_copied: int
    images_present: int  # already in the target, as they are (an earlier run)
    images_replaced: int  # in the target with other vectors, crops or fields: the source's now
    crops_copied: int
    thumbnails: int  # thumbnails stored in a server target
    images_without_file: int  # the source had no readable file for them
    vectors_checked: int
    seconds: float
    mirror: bool  # what the source lacks was removed from the target (else only counted)
    products_not_in_source: int  # target products whose sku the source lacks
    images_not_in_source: int  # target images the source lacks (those products' included)


@dataclass
class _Tally:
    copied: int = 0
    present: int = 0
    replaced: int = 0
    crops: int = 0
    thumbnails: int = 0
    no_file: int = 0
    products_not_in_source: int = 0
    images_not_in_source: int = 0


def migrate_catalog(
    source: Target,
    target: Target,
    *,
    mirror: bool = False,
    page: int = PAGE,
    progress: Callable[[int], None] | None = None,
) -> MigrateReport:
    """Copy catalog ``source`` into ``target`` (created like the source when absent; an
    existing one must have the same model and be empty or a copy of the source).

    ``mirror``: also remove from the target the products and images the source does not have
    (and set product fields exactly, cleared ones included), so that it ends equal to the
    source; without it they are kept and counted in the report. Raises CatalogError when the
    copy does not check out (counts or vectors differ)."""
    started = time.monotonic()
    with open_catalog(source) as src, _open_target(src, target, mirror) as dst:
        tally = _Tally()
        after = 0
        while products := src.list_products(after_id=after, limit=page):
            after = products[-1].id
            mine = _page_content(src, [p.id for p in products])
            with dst.write_lock():
                with dst.writing() as write:
                    # Read inside the write, on its connection: what the transaction sees.
                    copies = dst.store.products_by_skus([p.sku for p in products])
                    theirs = _page_content(dst, [p.id for p in copies.values()])
                    freed: BlobRefs = []
                    for product in products:
                        freed += _copy_product(
                            src, dst, write, product, tally, (mine, theirs), mirror=mirror
                        )
                _free_files(dst, freed)
            dst.save_indexes(measure=False)
            if progress:
                progress(len(products))
        _products_not_in_source(src, dst, tally, mirror=mirror, page=page)
        dst.save_indexes()
        checked = _check(src, dst, mirror=mirror)
    report = MigrateReport(
        source=src.location, target=dst.location, products=checked[0],
        images_copied=tally.copied, images_present=tally.present,
        images_replaced=tally.replaced, crops_copied=tally.crops, thumbnails=tally.thumbnails,
        images_without_file=tally.no_file, vectors_checked=checked[1],
        seconds=round(time.monotonic() - started, 2), mirror=mirror,
        products_not_in_source=tally.products_not_in_source,
        images_not_in_source=tally.images_not_in_source,
    )  # fmt: skip
    log.info("migrated %s -> %s: %s", report.source, report.target, report)
    if not mirror and (report.products_not_in_source or report.images_not_in_source):
        log.warning(
            "%s keeps %d products and %d images that %s does not have (mirror removes them)",
            report.target, report.products_not_in_source, report.images_not_in_source,
            report.source,
        )  # fmt: skip
    return report


def _open_target(src: Catalog, target: Target, mirror: bool) -> Catalog:
    _refuse_sku_twins(src)
    catalog_id = _catalog_id(src)  # first: a card it refuses leaves no new target behind
    if catalog_exists(target):
        dst = open_catalog(target)
        if dst.model_id != src.model_id or dst.dim != src.dim:
            dst.close()
            raise CatalogError(
                f"{dst.location} holds vectors of model {dst.model_id} (dim {dst.dim}), the"
                f" source {src.model_id} (dim {src.dim}): they cannot share a catalog"
            )
        try:
            _check_existing_target(src, dst, catalog_id, mirror)
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
        crop_mode=src.crop_mode, detector=src.card.detector, catalog_views=src.catalog_views,
        **_stamp(dst, catalog_id),
    )  # fmt: skip
    return dst


def _refuse_sku_twins(src: Catalog) -> None:
    """A source holding one sku in two Unicode forms (two products) would be merged into one
    product of the copy, and ``--mirror`` then fails every run on the counts: refused, with
    the repair, before anything is written."""
    twins = src.sku_twins()
    if twins:
        key, ids = next(iter(twins.items()))
        raise CatalogError(
            f"{src.location}: {len(twins)} skus are held by two or more products in other"
            f" Unicode forms (e.g. {key!r}: products {ids}), which a copy would merge: remove"
            f" one (snapshop catalog remove --id {ids[-1]}) and index its images again under"
            " the sku, then migrate"
        )


def _catalog_id(src: Catalog) -> str | None:
    """The source's ``catalog_id``, given to it now if it has none (its card is rewritten,
    nothing else; two migrates of it at once agree on one); None where its card cannot be
    written: its copies are then recognised by their skus only. A card whose id is not text
    is refused: a new id would silently disown every copy made before."""
    known = src.card.extra.get(CATALOG_ID)
    if CATALOG_ID not in src.card.extra:
        try:
            known = src.claim_card_extra(CATALOG_ID, uuid.uuid4().hex)
        except (OSError, CatalogError) as exc:
            log.warning("%s: cannot record a catalog id in its card (%s)", src.location, exc)
            return None
    if not isinstance(known, str) or not known.strip():
        card = f"{src.location} (its card)" if src.is_server else str(src.directory / CARD_FILE)
        raise CatalogError(
            f"{card}: catalog_id {known!r} is not a catalog id (a text, as migrate writes):"
            " its copies carry the one it had; restore it, or remove the key to give the"
            " catalog a new one (copies are then told by their skus alone)"
        )
    return known


def _stamp(dst: Catalog, catalog_id: str | None) -> dict[str, object]:
    """The card change that marks ``dst`` as a copy of the catalog ``catalog_id``."""
    if catalog_id is None or dst.card.extra.get(CATALOG_ID) == catalog_id:
        return {}
    return {"extra": {**dst.card.extra, CATALOG_ID: catalog_id}}


def _check_existing_target(
    src: Catalog, dst: Catalog, catalog_id: str | None, mirror: bool
) -> None:
    """``dst`` may be an empty catalog or a copy of ``src`` (an interrupted or older one), never
    another catalog: its products would be mixed with the source's, a shared sku overwritten,
    and a mirror would delete them. A copy carries the source's ``catalog_id``; a target
    without it (empty, or copied before ids existed) passes while it holds only the source's
    skus, and is given the id."""
    copy = catalog_id is not None and dst.card.extra.get(CATALOG_ID) == catalog_id
    foreign: list[str] = []
    after = 0
    while not copy and (page := dst.list_products(after_id=after, limit=PAGE)):
        after = page[-1].id
        known = src.store.products_by_skus([p.sku for p in page])  # one query a page
        foreign += [p.sku for p in page if lookup_sku(p.sku) not in known]
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
    stamp = _stamp(dst, catalog_id)
    # Holding no image, nothing was made another way yet: the card becomes the source's, a
    # detector included (a card without one, as a copy killed right after creating it left,
    # would make later searches and ingests skip garment detection). A copy mirrored takes
    # the source's card too: every image whose crops differ is replaced.
    if dst.counts()["images"] == 0 or (copy and mirror):
        changes = dict(zip(("crop_mode", "detector", "catalog_views"), mine, strict=True))
        if mine != theirs or stamp:
            dst.rewrite_card(**changes, **stamp)
        return
    differ = [f"{name} {a!r} here, {b!r} in the source"
              for name, b, a in zip(("crop_mode", "detector", "catalog_views"), mine, theirs,
                                    strict=True)
              if a != b and a is not None and b is not None]  # fmt: skip
    if differ:
        hint = " (a copy of it: --mirror makes it equal)" if copy else ""
        raise CatalogError(f"{dst.location} was built differently{hint}: {'; '.join(differ)}")
    if stamp:
        dst.rewrite_card(**stamp)


@dataclass(frozen=True)
class _PageContent:
    """What one catalog holds of a page of products, read in a few queries: their images (by
    id), those images' vectors, their crops (by id) and the crops' vectors."""

    images: dict[int, list[ImageRow]]  # product id -> images; every product id asked
    vectors: dict[int, np.ndarray]  # image id -> vector
    crops: dict[int, list[CropRow]]  # image id -> crops
    crop_vectors: dict[int, np.ndarray]  # crop id -> vector


def _page_content(catalog: Catalog, product_ids: list[int]) -> _PageContent:
    images = catalog.store.images_of_products(product_ids)
    image_ids = [image.id for rows in images.values() for image in rows]
    crops = catalog.store.crops_of_images(image_ids)
    crop_ids = [crop.id for rows in crops.values() for crop in rows]
    vectors = _vectors(catalog, "images", image_ids)
    crop_vectors = _vectors(catalog, "crops", crop_ids)
    # Several queries, not one snapshot: an image a live catalog deleted between them lacks
    # its vector or a crop's; it is left out, as a read a moment later would leave it out.
    gone = {i for i in image_ids
            if i not in vectors or any(c.id not in crop_vectors for c in crops[i])}  # fmt: skip
    if gone:
        images = {p: [image for image in rows if image.id not in gone]
                  for p, rows in images.items()}  # fmt: skip
    return _PageContent(images, vectors, crops, crop_vectors)


def _copy_product(
    src: Catalog,
    dst: Catalog,
    write: CatalogWrite,
    product: Product,
    tally: _Tally,
    page: tuple[_PageContent, _PageContent],
    *,
    mirror: bool,
) -> BlobRefs:
    """Bring ``product`` and its images into ``dst`` inside the open ``write``; images the
    target holds as they are stay (their ids too). ``page``: what the source and the target
    held of the product's page before this write; the target's entry for ``product`` is
    taken (a product new to the target, or one written already in this page, is read now).
    Returns the blob references of the image rows it deleted, whose files go once the write
    committed."""
    mine, theirs = page
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
    if mirror:
        _set_fields_exactly(dst, write, product_id, product)
    if product_id not in theirs.images:
        theirs = _page_content(dst, [product_id])
    images = mine.images[product.id]
    held = {image.sha256: image for image in theirs.images.pop(product_id)}
    wanted = {image.sha256 for image in images}
    dropped = [image for sha, image in held.items() if sha not in wanted]
    tally.images_not_in_source += len(dropped)
    freed: BlobRefs = []
    if mirror and dropped:
        freed += [(image.sha256, image.blob) for image in dropped]
        write.delete_images([image.id for image in dropped])
    vectors, crop_vectors = mine.vectors, mine.crop_vectors
    for image in images:
        crops = mine.crops[image.id]
        before = held.get(image.sha256)
        thumbnail = None
        if before is not None:
            if _same_image(
                (image, vectors[image.id], crops, crop_vectors),
                (before, theirs.vectors[before.id], theirs.crops[before.id], theirs.crop_vectors),
            ):
                tally.present += 1
                continue
            # Re-embedded or re-detected in the source since: its version replaces this one.
            # The row's delete takes a server's thumbnail with it: kept in case the source
            # has none to give.
            thumbnail = dst.store.get_blob(before.sha256) if dst.is_server else None
            freed.append((before.sha256, before.blob))
            write.delete_images([before.id])
        new_crops = [
            NewCrop(c.position, c.label, c.score, c.box, crop_vectors[c.id]) for c in crops
        ]
        without_file = tally.no_file
        blob = _copy_file(src, dst, write, image, tally)
        if before is not None and tally.no_file > without_file:  # the same bytes: keep theirs
            blob = before.blob
            if thumbnail is not None:
                small = load_image(thumbnail[0])
                write.put_thumbnail(image.sha256, thumbnail[0], small.width, small.height)
        try:
            write.insert_image(
                product_id, source=image.source, blob=blob, sha256=image.sha256,
                width=image.width, height=image.height, vector=vectors[image.id],
                crops=new_crops,
            )  # fmt: skip
        except FieldError as exc:  # a crop position no file may be named after, say
            raise CatalogError(
                f"image {image.id} of product {product.sku!r} of {src.location} cannot be"
                f" copied: {exc}; correct it in the source (or remove the product: snapshop"
                f" catalog remove --catalog SOURCE --id {product.id}), then run the migrate"
                " again to continue"
            ) from exc
        if before is None:
            tally.copied += 1
        else:
            tally.replaced += 1
        tally.crops += len(new_crops)
    return freed


def _set_fields_exactly(
    dst: Catalog, write: CatalogWrite, product_id: int, product: Product
) -> None:
    """Make the target product's fields the source's. An upsert only sets the fields given and
    merges attributes, so a field the source cleared, or an attribute it dropped, stays."""
    held = dst.store.get_product(product_id)  # this thread's transaction: sees the upsert
    names = (*PRODUCT_FIELDS, "attributes")
    if all(getattr(held, name) == getattr(product, name) for name in names):
        return
    sets = ", ".join(f"{name} = ?" for name in names)
    values = [getattr(product, name) for name in PRODUCT_FIELDS]
    # CatalogWrite has no call that clears a field: the statement runs in its transaction.
    write._db.execute(
        f"UPDATE products SET {sets}, updated_at = ? WHERE id = ?",
        (*values, attributes_json(product.attributes), now(), product_id),
    )


ImageContent = tuple[ImageRow, np.ndarray, list[CropRow], dict[int, np.ndarray]]


def _same_image(mine: ImageContent, theirs: ImageContent) -> bool:
    """Whether two image rows (with their vector, crops and crop vectors) hold the same thing,
    vectors bit for bit; ids, blob names and timestamps aside."""

    def content(image: ImageContent) -> tuple[object, ...]:
        row, vector, crops, crop_vectors = image
        return (row.sha256, row.source, row.width, row.height, vector.tobytes(), sorted(
            (c.position, c.label, c.score, c.box, crop_vectors[c.id].tobytes()) for c in crops
        ))  # fmt: skip

    return content(mine) == content(theirs)


def _products_not_in_source(
    src: Catalog, dst: Catalog, tally: _Tally, *, mirror: bool, page: int
) -> None:
    """Count the target's products whose sku the source lacks (with their images); with
    ``mirror`` remove them, one write transaction per page."""
    after = 0
    while products := dst.list_products(after_id=after, limit=page):
        after = products[-1].id
        known = src.store.products_by_skus([p.sku for p in products])
        gone = [p for p in products if lookup_sku(p.sku) not in known]
        if not gone:
            continue
        if not mirror:
            tally.products_not_in_source += len(gone)
            images = dst.store.images_of_products([p.id for p in gone])
            tally.images_not_in_source += sum(len(rows) for rows in images.values())
            continue
        with dst.write_lock():
            with dst.writing() as write:
                # Read again inside the write: another run (a rerun overlapping this one)
                # may have removed some since they were listed.
                held = dst.store.products_by_ids([p.id for p in gone])
                gone = [p for p in gone if p.id in held]
                tally.products_not_in_source += len(gone)
                freed: BlobRefs = []
                for product in gone:
                    freed += dst.store.blob_refs_of_product(product.id)
                    tally.images_not_in_source += len(write.delete_product(product.id))
            _free_files(dst, freed)


def _free_files(dst: Catalog, freed: BlobRefs) -> None:
    """After the deleting write committed: a directory's image files no row references now
    (a server's thumbnails went with their last row, in the transaction)."""
    if freed and not dst.is_server:
        free_unreferenced_blobs(dst.directory, dst.store, freed)


def _copy_file(
    src: Catalog, dst: Catalog, write: CatalogWrite, image: ImageRow, tally: _Tally
) -> str | None:
    """What ``dst`` keeps of the image's file: a server's thumbnail, or a directory's blob
    (only a directory source has the file itself). Returns the row's ``blob`` value."""
    if src.is_server:
        if not dst.is_server:
            tally.no_file += 1
            return None
        found = src.store.get_blob(image.sha256)
        if found is None:
            tally.no_file += 1
        else:
            small = load_image(found[0])
            write.put_thumbnail(image.sha256, found[0], small.width, small.height)
            tally.thumbnails += 1
        return None
    path = blob_file(src.directory, image.blob, image.sha256) if image.blob else None
    if path is None or not path.is_file():
        tally.no_file += 1
        return None
    if not dst.is_server:
        from snapshop.catalog.blobs import write_blob

        return write_blob(dst.blob_dir, image.sha256, path.read_bytes())
    try:
        pixels = load_image(path, stored_file_limits())
    except ImageDecodeError as exc:
        log.warning("image %s: stored file unreadable (%s); copied without it", image.id, exc)
        tally.no_file += 1
        return None
    data, width, height = thumbnail_jpeg(pixels)
    write.put_thumbnail(image.sha256, data, width, height)
    tally.thumbnails += 1
    return None


def _vectors(catalog: Catalog, table: str, ids: list[int]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    if not ids:
        return out
    for batch_ids, vecs in catalog.store.iter_vectors(table, catalog.dim, ids=ids):
        out.update(zip(batch_ids.tolist(), vecs, strict=True))
    return out


def _check(src: Catalog, dst: Catalog, *, mirror: bool) -> tuple[int, int]:
    """Every source product is in ``dst`` with all its images; a sample of images has as
    many crops and an identical vector; mirrored, ``dst`` holds as many rows as ``src``.
    Returns (products checked, vectors compared)."""
    if mirror and (held := dst.counts()) != (expected := src.counts()):
        raise CatalogError(
            f"migrate check: {dst.location} holds {held}, {src.location} {expected} (was"
            " either written to during the copy? run it again)"
        )
    products = 0
    rng = np.random.default_rng(0)
    sample_rate = min(1.0, CHECK_SAMPLE / max(1, src.counts()["images"]))
    compared = 0
    after = 0
    while page := src.list_products(after_id=after, limit=PAGE):
        after = page[-1].id
        copies = dst.store.products_by_skus([p.sku for p in page])
        mine = src.store.images_of_products([p.id for p in page])
        theirs = dst.store.images_of_products([p.id for p in copies.values()])
        # The page's sample is drawn first and read in a few queries; its failures are then
        # raised in the order a product-by-product check meets them.
        sampled: list[tuple[ImageRow, ImageRow]] = []
        ends: list[int] = []  # per product checked: where its images in ``sampled`` end
        incomplete = None
        for product in page:
            copy = copies.get(lookup_sku(product.sku))
            by_sha = {i.sha256: i for i in ([] if copy is None else theirs[copy.id])}
            if copy is None or any(image.sha256 not in by_sha for image in mine[product.id]):
                incomplete = product
                break
            for image in mine[product.id]:
                if rng.random() < sample_rate:
                    sampled.append((image, by_sha[image.sha256]))
            ends.append(len(sampled))
        src_crops = src.store.crops_of_images([a.id for a, _ in sampled])
        dst_crops = dst.store.crops_of_images([b.id for _, b in sampled])
        src_vectors = _vectors(src, "images", [a.id for a, _ in sampled])
        dst_vectors = _vectors(dst, "images", [b.id for _, b in sampled])
        done = 0
        for end in ends:
            for image, other in sampled[done:end]:
                if image.id not in src_vectors:  # deleted from the live source since: no check
                    continue
                if other.id not in dst_vectors:
                    raise CatalogError(
                        f"migrate check: the copy of image {image.id} left {dst.location} during"
                        " the check (was it written to during the copy? run it again)"
                    )
                n_src, n_dst = len(src_crops[image.id]), len(dst_crops[other.id])
                if n_src != n_dst:
                    raise CatalogError(
                        f"migrate check: image {image.id}: {n_src} crops, copied {n_dst}"
                    )
                if not np.array_equal(src_vectors[image.id], dst_vectors[other.id]):
                    raise CatalogError(f"migrate check: vector of image {image.id} differs")
                compared += 1
            done = end
            products += 1
        if incomplete is not None:
            raise CatalogError(f"migrate check: product {incomplete.sku!r} incomplete in target")
    return products, compared
