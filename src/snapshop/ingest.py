"""Ingest pipeline: source records -> decode -> detect -> embed -> catalog store + indexes.

Idempotent: an image already stored for the same product (same sha256) is skipped before it
is decoded. Each batch is one SQLite transaction holding rows *and* vectors, so a crash loses
at most the batch in flight; indexes are saved every few batches and reconciled on open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.catalog.blobs import write_blob
from snapshop.catalog.catalog import DB_FILE, LOCK_FILE, Catalog
from snapshop.catalog.server import thumbnail_jpeg
from snapshop.catalog.store import CatalogStore, NewCrop, Product, open_store
from snapshop.catalog.write import CatalogWrite
from snapshop.config import check_int
from snapshop.data.sources import CatalogRecord
from snapshop.detect.base import (
    PRODUCT,
    Detection,
    Detector,
    frame_crop,
    keep_best_per_position,
    position_of_category,
    product_box,
    serial_if_needed,
)
from snapshop.errors import FieldError, ImageDecodeError, IngestError
from snapshop.images import (
    DecodeLimits,
    load_image,
    original_size,
    scale_to_original,
)
from snapshop.lifetime import arm_parent_death_signal
from snapshop.models.card import NORMALISATION
from snapshop.models.embedder import Embedder, preprocess
from snapshop.models.runtime import usable_cores
from snapshop.models.tta import is_packshot, mean_view, packshot_views

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = 512  # images a batch holds decoded at once


@dataclass
class IngestReport:
    """``skipped``: images the catalog already held; ``failed``: images that could not be
    indexed (source, reason); ``ignored``: files the source holds that are not supported
    images (source, reason)."""

    added: int = 0
    skipped: int = 0
    crops: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    products: set[str] = field(default_factory=set)
    created: set[int] = field(default_factory=set)  # ids of the products this ingest inserted
    removed: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # e.g. index files a full disk refused

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.added, "skipped": self.skipped, "crops": self.crops,
            "failed": [{"source": s, "reason": r} for s, r in self.failed],
            "ignored": [{"source": s, "reason": r} for s, r in self.ignored],
            "products": len(self.products), "removed": self.removed,
            "warnings": list(self.warnings), "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }  # fmt: skip


@dataclass
class Decoded:
    """A fresh image ready to embed: ``pixels`` are the embedder's input, ``blob`` is already
    written (a catalog directory; empty: the writer stores ``data``) or ``thumbnail`` made
    (JPEG bytes, width, height: a server catalog stores it in the image's transaction), and
    ``image`` is kept only when a detector or the catalog views need it. ``views``: a
    packshot's augmented views to average into its vector (0: the image alone; issue #20)."""

    record: CatalogRecord
    sha256: str
    size: tuple[int, int]
    pixels: NDArray[np.float32]
    blob: str | None
    image: Image.Image | None = None
    data: bytes | None = None
    thumbnail: tuple[bytes, int, int] | None = None
    views: int = 0


@dataclass
class Fresh:
    """An image the catalog does not hold yet, read and hashed but not decoded: the mapper
    that detects and embeds it decodes it (:func:`finish`), so the decoded pixels never
    cross a process boundary (issue #16)."""

    record: CatalogRecord
    sha256: str
    data: bytes


@dataclass
class Embedded:
    """A fresh image with its vectors, ready to commit: ``vector`` (D,) float32, L2-normalised,
    and its garment crops. ``blob`` is empty while the bytes (``data``) are not stored yet;
    a server catalog stores ``thumbnail`` instead."""

    record: CatalogRecord
    sha256: str
    size: tuple[int, int]
    blob: str | None
    vector: NDArray[np.float32]
    crops: list[NewCrop]
    data: bytes | None = None
    thumbnail: tuple[bytes, int, int] | None = None


def embed_batch(
    embedder: Embedder, detector: Detector | None, crop_mode: str, batch: Sequence[Decoded]
) -> list[Embedded]:
    """Detect and embed decoded images: the one mapper both runners call (this process, or a
    Ray actor in :mod:`snapshop.ingest_ray`)."""
    if not batch:
        return []
    # The photos need no boxes: they are embedded on a thread beside detection (issue #16);
    # only the crops wait for the detector.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshop-embed") as beside:
        photos = beside.submit(embedder.embed_arrays, np.stack([d.pixels for d in batch]))
        crops_per_image = [
            _detect_crops(
                detector, d.image, crop_mode, d.record.metadata.get("category"), d.record.packshot
            )
            if d.image is not None
            else []
            for d in batch
        ]
        crop_vecs = embedder.embed_images([c[4] for cs in crops_per_image for c in cs])
        image_vecs = photos.result()
    for i, d in enumerate(batch):
        if d.views and d.image is not None:
            image_vecs[i] = packshot_vector(embedder, d.image, d.views)
    out = []
    offset = 0
    for d, vec, crops in zip(batch, image_vecs, crops_per_image, strict=True):
        new = [NewCrop(pos, label, score, box, crop_vecs[offset + j])
               for j, (pos, label, score, box, _) in enumerate(crops)]  # fmt: skip
        offset += len(crops)
        out.append(Embedded(d.record, d.sha256, d.size, d.blob, vec, new, d.data, d.thumbnail))
    return out


def embed_one(
    embedder: Embedder, detector: Detector | None, crop_mode: str, decoded: Decoded
) -> Embedded:
    """Detect and embed one decoded image on the calling thread, the photo and each crop in
    its own one-image call: the per-photo mapper of the in-process pipeline, which runs one
    per core side by side (issue #16). Same vectors as :func:`embed_batch`."""
    d = decoded
    crops = (
        _detect_crops(
            detector, d.image, crop_mode, d.record.metadata.get("category"), d.record.packshot
        )
        if d.image is not None
        else []
    )
    size, normalisation = embedder.input_size, embedder.card.normalisation
    if d.views and d.image is not None:
        vector = packshot_vector(embedder, d.image, d.views)
    else:
        vector = embedder.embed_arrays(d.pixels[None])[0]
    pixels = [preprocess(c[4], size, normalisation) for c in crops]
    vecs = [embedder.embed_arrays(x[None])[0] for x in pixels]
    new = [NewCrop(pos, label, score, box, vec)
           for (pos, label, score, box, _), vec in zip(crops, vecs, strict=True)]  # fmt: skip
    return Embedded(d.record, d.sha256, d.size, d.blob, vector, new, d.data, d.thumbnail)


def packshot_vector(embedder: Embedder, image: Image.Image, views: int) -> NDArray[np.float32]:
    """(D,) float32, L2-normalised: the mean of the normalised embeddings of ``image``, its
    mirror and ``views`` augmented views (:func:`snapshop.models.tta.packshot_views`),
    embedded as one batch (issue #20: photo -> catalog R@1 +0.034 bf16 / +0.040 fp32 for
    ImageNet Lite2 on grocery-dev's folds)."""
    return mean_view(embedder.embed_images([image, *packshot_views(image, views)]))


def _map_one(
    job: PrepareJob,
    blob_dir: Path | None,
    embedder: Embedder,
    detector: Detector | None,
    crop_mode: str,
    item: Fresh | Decoded,
) -> Embedded | tuple[str, str]:
    """Decode (unless a decode worker did), detect and embed one fresh image; a failure
    comes back as (source, reason)."""
    decoded = finish(job, item, blob_dir) if isinstance(item, Fresh) else item
    if not isinstance(decoded, Decoded):
        return decoded
    return embed_one(embedder, detector, crop_mode, decoded)


def _detect_crops(
    detector: Detector | None,
    image: Image.Image,
    crop_mode: str,
    category: str | None = None,
    packshot: bool = False,
) -> list[tuple[str, str, float, tuple[float, float, float, float], Image.Image]]:
    """The garment crops of one catalog image: the best detection per position, boxes in
    the original file's pixels.

    A product whose ``category`` names a garment position (tops, jeans...) is that garment:
    only its position's crop is kept (the model's other clothes are not the product), and
    when the detector finds none there (a flat product shot), the whole product's box is it.
    A ``packshot`` (the product alone, no model) of such a product is not detected at all:
    its whole-product box is the crop (a detector made for worn clothes boxes a lone garment
    in parts).
    """
    if detector is None:
        return []
    position = position_of_category(category)
    detections = [] if packshot and position is not None else detector.detect(image)
    best = keep_best_per_position(detections)
    if position is not None:
        det = best.get(position)
        if det is None:
            whole = [d.box for d in detections if d.label == PRODUCT and d.position is None]
            box = whole[0] if whole else product_box(np.asarray(image.convert("RGB")))
            det = Detection(box, PRODUCT, position, 1.0)
        best = {position: det}
    out = []
    sx, sy = scale_to_original(image)  # boxes are stored in the file's pixels
    for position, det in sorted(best.items()):
        pixels = frame_crop(image, det.box, crop_mode)
        if pixels is not None:
            stored_box = det.box.scaled(sx, sy).as_tuple()
            out.append((position, det.label, det.score, stored_box, pixels))
    return out


def _upsert_or_fail(write: CatalogWrite, record: CatalogRecord, report: IngestReport) -> int | None:
    """The record's product, inserted or updated; None, and the record counted as failed,
    when its fields with the stored ones break a limit (attributes merged over 20,000
    characters, say): refused before any SQL runs, so the batch's other rows still commit."""
    try:
        return write.upsert_product(record.sku, **record.metadata)
    except FieldError as exc:
        report.failed.append((str(record.path), f"product {record.sku!r}: {exc}"))
        return None


def _metadata_changes(product: Product, metadata: dict[str, Any]) -> bool:
    """Whether upserting ``metadata`` would change ``product``."""
    for key, value in metadata.items():
        if key == "attributes":
            if any(product.attributes.get(k) != v for k, v in (value or {}).items()):
                return True
        elif value is not None and getattr(product, key, None) != value:
            return True
    return False


class Ingestor:
    """Writes records into a catalog in batches. Reusable for many sources."""

    def __init__(
        self,
        catalog: Catalog,
        embedder: Embedder,
        detector: Detector | None = None,
        *,
        batch_size: int = 32,
        save_every: int = 8,
        limits: DecodeLimits = DecodeLimits(),
        workers: int | None = None,
        prefetch_batches: int = 2,
        mappers: int | None = None,
    ) -> None:
        """``workers`` decode processes (None: one per core, at most 4; 0: decode in-process);
        they read, hash, dedup-check, decode and preprocess ahead of the writer, at most
        ``prefetch_batches`` batches in all (one of them in the mappers when there are), so
        memory stays flat however long the source is.

        ``mappers`` threads decode, detect and embed, one photo each at a time, while the
        writer commits the batch before (issue #16; :func:`embed_one`): the decode workers
        then only read, hash and skip known images. None: one per core; 0: the photos are
        decoded by the workers and detected and embedded in this thread, one batch at a time.

        ``batch_size`` is 1 to :data:`MAX_BATCH_SIZE` images (the CLI's range): the others are
        a ConfigError, before anything is read."""
        self.batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        self.save_every = check_int("save_every", save_every, 1)
        self.prefetch_batches = check_int("prefetch_batches", prefetch_batches, 1)
        cores = min(4, os.cpu_count() or 1)
        self.workers = cores if workers is None else check_int("workers", workers, 0)
        self.mappers = usable_cores() if mappers is None else check_int("mappers", mappers, 0)
        catalog.check_model(embedder.model_id)
        self.catalog = catalog
        self.embedder = embedder
        self.detector = detector
        self.limits = limits

    def update_known(self, records: Sequence[CatalogRecord], report: IngestReport) -> None:
        """Count images the catalog already holds; a known image whose record carries changed
        product metadata still updates the product (re-ingesting an edited CSV updates titles,
        prices... without re-embedding)."""
        updates = []
        for record in records:
            report.skipped += 1
            report.products.add(record.sku)
            product = self.catalog.find_product(record.sku)
            if product is not None and _metadata_changes(product, record.metadata):
                updates.append(record)
        if updates:
            with self.catalog.writing() as write:  # metadata only: indexes unchanged
                for record in updates:
                    _upsert_or_fail(write, record, report)

    def commit(self, batch: Sequence[Embedded], report: IngestReport) -> None:
        """Write embedded images in one transaction: the one writer of every runner. An image
        the catalog holds by now (another writer, or the same file twice) is skipped."""
        # Vectors reach the indexes only after their rows committed (``Catalog.writing``).
        with self.catalog.writing() as write:
            for e in batch:
                product_id = _upsert_or_fail(write, e.record, report)
                if product_id is None:
                    continue
                if write.find_image(product_id, e.sha256) is not None:
                    report.skipped += 1  # another writer added it since we looked
                    report.products.add(e.record.sku)
                    continue
                if e.thumbnail is not None:
                    write.put_thumbnail(e.sha256, *e.thumbnail)
                elif not self._blob_in_place(e, report):
                    continue
                _, crop_ids = write.insert_image(
                    product_id, source=str(e.record.path), blob=e.blob, sha256=e.sha256,
                    width=e.size[0], height=e.size[1], vector=e.vector, crops=e.crops,
                )  # fmt: skip
                report.added += 1
                report.crops += len(crop_ids)
                report.products.add(e.record.sku)
        report.created |= write.created_products  # committed

    def _blob_dir(self) -> Path | None:
        """Where image files go: the catalog's blob folder; None for a server catalog."""
        return None if self.catalog.is_server else self.catalog.blob_dir

    def _blob_in_place(self, d: Embedded, report: IngestReport) -> bool:
        """Under the write lock, before the row naming ``blob`` commits: make sure the file is
        there. Another process deleting the last row that shared these bytes (or collecting
        garbage) may have removed it between our write and now; deletes and collections
        remove files under this same lock, so once checked here the file stays."""
        if d.blob and (self.catalog.directory / d.blob).is_file():
            return True
        reason = "the source changed since it was read"
        try:  # without a copy of the bytes at hand (the prepare step keeps none): read again
            data = d.data if d.data is not None else d.record.read(self.limits)
        except ImageDecodeError as exc:
            data = b""
            reason = exc.reason
        if hashlib.sha256(data).hexdigest() != d.sha256:
            why = f"stored copy removed by a concurrent delete and {reason}"
            report.failed.append((str(d.record.path), why))
            return False
        write_blob(self.catalog.blob_dir, d.sha256, data)
        log.info("stored %s again: removed by a concurrent writer", d.blob)
        return True

    def ingest(
        self,
        records: Iterable[CatalogRecord],
        progress: Callable[[int], None] | None = None,
        sync: bool = False,
    ) -> IngestReport:
        """Ingest ``records``. With ``sync``, images of the source's products that the source
        no longer lists are removed (a product update)."""
        return self.ingest_batches(records, self._mapped, progress, sync)

    def _mapped(
        self, records: Iterable[CatalogRecord], report: IngestReport
    ) -> Iterator[tuple[list[Embedded], int]]:
        """The in-process runner: each batch's fresh photos decoded, detected and embedded by
        ``mappers`` threads, one photo per thread at a time (:func:`_map_one`), while the
        batch before is written, so both cores stay busy through every stage and the commits
        (issue #16). Batches come out in source order, and what a batch reports (known,
        failed, skipped) is counted as it is handed on, in source order too."""
        job, blob_dir = self.prepare_job(), self._blob_dir()
        detector = serial_if_needed(self.detector) if self.mappers else self.detector
        map_one = partial(_map_one, job, blob_dir, self.embedder, detector, self.catalog.crop_mode)
        pool = ThreadPoolExecutor(self.mappers, "snapshop-map") if self.mappers else None
        pending: deque[list[Any]] = deque()
        try:
            for outcomes in self._batches(records, job, report):
                slots: list[Any] = []
                seen: set[tuple[str, str]] = set()
                for outcome in outcomes:
                    if isinstance(outcome, Fresh | Decoded):
                        key = (outcome.record.sku, outcome.sha256)
                        if key in seen:  # the same file twice in one batch
                            slots.append(_DUPLICATE)
                            continue
                        seen.add(key)
                        slots.append(pool.submit(map_one, outcome) if pool else map_one(outcome))
                        continue
                    slots.append(outcome)
                pending.append(slots)
                if len(pending) > self._mapped_ahead:
                    yield self._handed_on(pending.popleft(), report)
            while pending:
                yield self._handed_on(pending.popleft(), report)
        finally:  # an error (here or in the writer): photos not started are not mapped
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @property
    def _mapped_ahead(self) -> int:
        """Batches in the mappers while the writer commits: one when there are mappers."""
        return 1 if self.mappers else 0

    def _handed_on(self, slots: list[Any], report: IngestReport) -> tuple[list[Embedded], int]:
        """A batch's embedded images, in source order, its other outcomes counted."""
        embedded: list[Embedded] = []
        known: list[CatalogRecord] = []
        for slot in slots:
            outcome = slot.result() if isinstance(slot, Future) else slot
            if isinstance(outcome, Embedded):
                embedded.append(outcome)
            elif isinstance(outcome, CatalogRecord):
                known.append(outcome)
            elif outcome is _DUPLICATE:
                report.skipped += 1
            else:
                report.failed.append(outcome)
        self.update_known(known, report)
        return embedded, len(slots)

    def ingest_batches(
        self,
        records: Iterable[CatalogRecord],
        runner: Callable[
            [Iterable[CatalogRecord], IngestReport], Iterator[tuple[list[Embedded], int]]
        ],
        progress: Callable[[int], None] | None = None,
        sync: bool = False,
    ) -> IngestReport:
        """Commit what ``runner(records, report)`` yields, (embedded images, records consumed)
        per batch, saving indexes every ``save_every`` batches: the part every runner shares.
        The runner counts known and failed records into ``report`` itself."""
        start = time.perf_counter()
        report = IngestReport()
        if sync:
            records = list(records)
        batches_since_save = 0
        batches = runner(records, report)
        try:
            for batch, consumed in batches:
                if batch:
                    self.commit(batch, report)
                    batches_since_save += 1
                if batches_since_save >= self.save_every:
                    self._save(report)
                    batches_since_save = 0
                if progress:
                    progress(consumed)
        finally:  # a runner's threads and workers end with the ingest, however it ends
            batches.close()  # type: ignore[attr-defined]
        if sync:
            report.removed = self._sync(records)  # type: ignore[arg-type]
        self._save(report)
        for source, reason in report.failed:  # the report carries them; callers show them
            log.info("not indexed %s: %s", source, reason)
        report.seconds = time.perf_counter() - start
        return report

    def _save(self, report: IngestReport) -> None:
        warning = self.catalog.save_after_commit()
        if warning is not None and warning not in report.warnings:
            report.warnings.append(warning)

    def prepare_job(self) -> PrepareJob:
        """What :func:`prepare` / :func:`decode` need to know, wherever they run."""
        return PrepareJob(
            limits=self.limits, input_size=self.embedder.input_size,
            keep_image=self.detector is not None, normalisation=self.embedder.card.normalisation,
            thumbnails=self.catalog.is_server, decode=not self.mappers,
            catalog_views=self.catalog.catalog_views,
        )  # fmt: skip

    # --- batch pipeline (issue #6): parallel decode workers, bounded prefetch -----------------
    def _batches(
        self, records: Iterable[CatalogRecord], job: PrepareJob, report: IngestReport
    ) -> Iterator[list[_Outcome]]:
        """:func:`prepare`'s outcomes, ``batch_size`` records at a time, in source order.

        Every record goes through :func:`prepare`, in this process or in decode workers; only
        the runner differs."""
        small = isinstance(records, Sequence) and len(records) <= 2 * self.batch_size
        if self.workers == 0 or small:
            outcomes: Iterator[_Outcome] = (prepare(job, r, self.catalog, self._blob_dir())
                                            for r in records)  # fmt: skip
        else:
            outcomes = self._prepared_by_workers(records, job, report)
        batch: list[_Outcome] = []
        for outcome in outcomes:
            batch.append(outcome)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _prepared_by_workers(
        self, records: Iterable[CatalogRecord], job: PrepareJob, report: IngestReport
    ) -> Iterator[_Outcome]:
        """:func:`prepare`'s outcomes, in source order, from ``workers`` decode processes
        that run up to ``prefetch_batches`` batches ahead (one of them in the mappers)."""
        window = self.batch_size * (self.prefetch_batches + 1 - self._mapped_ahead)
        ctx = mp.get_context("spawn")  # fork would copy ONNX Runtime / faiss thread state
        pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
        )
        with pool:
            pending: deque[tuple[Future[_Outcome], CatalogRecord]] = deque()
            source = iter(records)
            db_path, blob_dir = self.catalog.store_target, self._blob_dir()
            handled = False
            while True:
                try:
                    while len(pending) < window and (record := next(source, None)) is not None:
                        future = pool.submit(_prepare_in_worker, job, db_path, blob_dir, record)
                        pending.append((future, record))
                    if not pending:
                        return
                    outcome = pending[0][0].result()
                except BrokenProcessPool:
                    if not handled:
                        raise IngestError(_WORKERS_DIED_STARTING) from None
                    at = f" at or after {pending[0][1].path}" if pending else ""
                    raise IngestError(
                        f"a decode worker process died (killed, or out of memory){at};"
                        f" the {report.added} images added so far are kept: run the ingest again"
                        " to continue (with 0 workers, images are decoded in this process)"
                    ) from None
                pending.popleft()
                handled = True
                yield outcome

    def _sync(self, records: Sequence[CatalogRecord]) -> int:
        wanted: dict[str, set[str]] = {}
        unreadable: dict[str, set[str]] = {}  # listed but unreadable now: keep what they were
        for record in records:
            try:
                data = record.read(self.limits)
            except ImageDecodeError:
                unreadable.setdefault(record.sku, set()).add(os.path.abspath(record.path))
                continue
            wanted.setdefault(record.sku, set()).add(hashlib.sha256(data).hexdigest())
        stale: list[int] = []
        for sku, shas in wanted.items():
            product = self.catalog.find_product(sku)
            if product is None:
                continue
            keep = unreadable.get(sku, set())
            stale += [
                im.id
                for im in self.catalog.images_of(product.id)
                if im.sha256 not in shas and not _may_be_listed(im.source, keep)
            ]
        if stale:
            self.catalog.remove_images(stale)
        return len(stale)


def _may_be_listed(source: str, unreadable: set[str]) -> bool:
    """Whether a stored image may be one of the listed files that cannot be read now: its
    source is one of them, or a relative path (stored by an older version, relative to a
    working directory unknown now) while any of them is unreadable."""
    if not unreadable:
        return False
    return not os.path.isabs(source) or os.path.abspath(source) in unreadable


def discard_empty_catalog(directory: Path, remove_directory: bool) -> bool:
    """Delete the catalog in ``directory`` if it holds no product: an ingest that created it
    and indexed nothing leaves nothing behind. Under the write lock, so a catalog another
    process has filled meanwhile is kept. Returns whether it was deleted."""
    with open(directory / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        store = CatalogStore(directory / DB_FILE, readonly=True)
        try:
            if store.counts()["products"]:
                return False
        finally:
            store.close()
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    if remove_directory:
        with contextlib.suppress(OSError):
            directory.rmdir()
    log.info("%s: nothing was indexed, the new catalog is removed", directory)
    return True


# --- prepare: the one step decode workers and the in-process path share ---------------------
@dataclass(frozen=True)
class PrepareJob:
    limits: DecodeLimits
    input_size: int
    keep_image: bool  # a detector will look at the image
    thumbnails: bool = False  # a server catalog stores a thumbnail instead of the file
    normalisation: Mapping[str, float] = field(default_factory=lambda: dict(NORMALISATION))
    decode: bool = True  # False: prepare leaves a fresh image to its mapper (:func:`finish`)
    catalog_views: int = 0  # a packshot's vector averages this many views (the catalog card's)


_Outcome = Decoded | Fresh | CatalogRecord | tuple[str, str]
_DUPLICATE = "the same file twice in one batch"  # a batch slot: counted as skipped


class KnownImages(Protocol):
    """What :func:`prepare` asks of the catalog: an open ``Catalog``, or a decode worker's
    read-only ``CatalogStore``."""

    def find_product(self, sku: str) -> Product | None: ...

    def has_image(self, product_id: int, sha256: str) -> bool: ...


def prepare(
    job: PrepareJob, record: CatalogRecord, known: KnownImages, blob_dir: Path | None
) -> _Outcome:
    """Read, sha256, skip if the catalog already holds it (returns the record), then
    :func:`finish` it (unless ``job.decode`` is off: the :class:`Fresh` image comes back).
    Failures come back as (source, reason)."""
    data = read_record(job, record)
    if isinstance(data, tuple):
        return data
    sha = hashlib.sha256(data).hexdigest()
    product = known.find_product(record.sku)
    if product is not None and known.has_image(product.id, sha):
        if blob_dir is not None:  # a stored copy lost or damaged since is stored again
            write_blob(blob_dir, sha, data)
        return record
    fresh = Fresh(record, sha, data)
    return finish(job, fresh, blob_dir) if job.decode else fresh


def finish(job: PrepareJob, fresh: Fresh, blob_dir: Path | None) -> Decoded | tuple[str, str]:
    """Decode and preprocess a fresh image for the embedder and store the blob in
    ``blob_dir`` (None: a server catalog, whose thumbnail :func:`decode` made)."""
    decoded = decode(job, fresh.record, fresh.data, fresh.sha256)
    if isinstance(decoded, Decoded):
        blob = write_blob(blob_dir, fresh.sha256, fresh.data) if blob_dir is not None else None
        decoded.blob, decoded.data = blob, None
    return decoded


def read_record(job: PrepareJob, record: CatalogRecord) -> bytes | tuple[str, str]:
    """The bytes of ``record``'s image, or (source, reason) when it cannot be read."""
    try:
        return record.read(job.limits)
    except ImageDecodeError as exc:
        return (str(record.path), exc.reason)


def decode(
    job: PrepareJob, record: CatalogRecord, data: bytes, sha: str
) -> Decoded | tuple[str, str]:
    """Decode and preprocess for the embedder; the bytes ride along in ``data`` (no blob is
    written here). Failures come back as (source, reason)."""
    try:
        image = load_image(data, job.limits)
    except ImageDecodeError as exc:
        return (str(record.path), exc.reason)
    pixels = preprocess(image, job.input_size, job.normalisation)
    size = original_size(image)  # a large image is decoded reduced
    thumbnail = thumbnail_jpeg(image) if job.thumbnails else None
    # only a packshot gets the views: they imitate shop photos of a product alone on white
    views = job.catalog_views if job.catalog_views and is_packshot(image) else 0
    kept = image if job.keep_image or views else None
    return Decoded(record, sha, size, pixels, "", kept, data, thumbnail, views)


# --- decode workers (issue #6) ------------------------------------------------------------------
# Workers are spawned: each re-imports the main script, so a script that ingests at its top level
# starts an ingest inside every worker, which multiprocessing refuses: the worker exits at once.
_WORKERS_DIED_STARTING = (
    "the decode worker processes died before handling any image. Most likely the ingest was"
    ' started at the top level of a script without `if __name__ == "__main__":`: decode'
    " workers are started with the spawn method, which runs the script's top level again in"
    " each worker. Put the calls under that guard, or pass workers=0 to decode in this process"
    " (a worker killed, or out of memory, is the other cause)"
)
_worker_stores: dict[str, CatalogStore] = {}
_PARENT_POLL_SECONDS = 0.5


def _prepare_in_worker(
    job: PrepareJob, store_target: str, blob_dir: Path | None, record: CatalogRecord
) -> _Outcome:
    store = _worker_stores.get(store_target)
    if store is None:
        store = _worker_stores[store_target] = open_store(store_target, readonly=True)
    return prepare(job, record, store, blob_dir)


def _worker_init(parent_pid: int) -> None:
    """A decode worker ends when the ingest that started it dies, even by ``kill -9``.

    Nothing else would end it: a worker waiting on the pool's call queue does not notice its
    parent is gone (measured: it waited forever, re-parented to pid 1), and while it lives it
    keeps multiprocessing's resource tracker alive too (the tracker exits once every holder
    of its pipe is gone). On Linux the kernel sends SIGKILL when the parent thread dies (the
    pool starts workers from the thread that runs the ingest, which outlives the pool);
    elsewhere, and as a second line, a thread polls the parent's pid.
    """
    arm_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                     name="snapshop-parent-watchdog").start()  # fmt: skip


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_SECONDS)
    os._exit(1)
