"""Ingest pipeline: source records -> decode -> detect -> embed -> catalog store + indexes.

Idempotent: an image already stored for the same product (same sha256) is skipped before it
is decoded. Each batch is one SQLite transaction holding rows *and* vectors, so a crash loses
at most the batch in flight; indexes are saved every few batches and reconciled on open.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from snapshop.catalog.catalog import Catalog
from snapshop.catalog.store import NewCrop
from snapshop.data.sources import CatalogRecord
from snapshop.detect.base import Detector, crop, keep_best_per_position
from snapshop.errors import ImageDecodeError
from snapshop.images import DecodeLimits, load_image, read_bytes, sniff_format
from snapshop.models.embedder import Embedder

log = logging.getLogger(__name__)

FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
                 "BMP": ".bmp", "TIFF": ".tif"}  # fmt: skip


@dataclass
class IngestReport:
    added: int = 0
    skipped: int = 0
    crops: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    products: set[str] = field(default_factory=set)
    removed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.added, "skipped": self.skipped, "crops": self.crops,
            "failed": [{"source": s, "reason": r} for s, r in self.failed],
            "products": len(self.products), "removed": self.removed,
            "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 2),
        }  # fmt: skip


@dataclass
class Decoded:
    record: CatalogRecord
    data: bytes
    sha256: str
    image: Image.Image


def write_blob(blob_dir: Path, sha256: str, data: bytes) -> str:
    """Store ``data`` content-addressed; returns the path relative to the catalog."""
    suffix = FORMAT_SUFFIX.get(sniff_format(data) or "", ".bin")
    rel = Path("blobs") / sha256[:2] / f"{sha256}{suffix}"
    target = blob_dir.parent / rel
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            Path(tmp).replace(target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return str(rel)


def _detect_crops(
    detector: Detector | None, image: Image.Image
) -> list[tuple[str, str, float, tuple[float, float, float, float], Image.Image]]:
    if detector is None:
        return []
    out = []
    for position, det in sorted(keep_best_per_position(detector.detect(image)).items()):
        pixels = crop(image, det.box)
        if pixels is not None:
            out.append((position, det.label, det.score, det.box.as_tuple(), pixels))
    return out


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
    ) -> None:
        catalog.check_model(embedder.model_id)
        self.catalog = catalog
        self.embedder = embedder
        self.detector = detector
        self.batch_size = batch_size
        self.save_every = save_every
        self.limits = limits

    def _known(
        self, records: Sequence[CatalogRecord], report: IngestReport
    ) -> list[tuple[CatalogRecord, bytes, str]]:
        """Read bytes and drop images the catalog already holds for the same product."""
        fresh = []
        store = self.catalog.store
        for record in records:
            try:
                data = record.read(self.limits)
            except ImageDecodeError as exc:
                report.failed.append((str(record.path), exc.reason))
                continue
            sha = hashlib.sha256(data).hexdigest()
            product = store.find_product(record.sku)
            if product is not None and store.has_image(product.id, sha):
                report.skipped += 1
                report.products.add(record.sku)
                continue
            fresh.append((record, data, sha))
        return fresh

    def _decode(
        self, items: Sequence[tuple[CatalogRecord, bytes, str]], report: IngestReport
    ) -> list[Decoded]:
        decoded = []
        seen: set[tuple[str, str]] = set()
        for record, data, sha in items:
            if (record.sku, sha) in seen:  # the same file twice in one batch
                report.skipped += 1
                continue
            try:
                image = load_image(data, self.limits)
            except ImageDecodeError as exc:
                report.failed.append((str(record.path), exc.reason))
                continue
            seen.add((record.sku, sha))
            decoded.append(Decoded(record, data, sha, image))
        return decoded

    def _write_batch(self, batch: list[Decoded], report: IngestReport) -> None:
        crops_per_image = [_detect_crops(self.detector, d.image) for d in batch]
        pixels = [d.image for d in batch] + [c[4] for cs in crops_per_image for c in cs]
        vectors = self.embedder.embed_images(pixels)
        image_vecs, crop_vecs = vectors[: len(batch)], vectors[len(batch) :]
        blobs = [write_blob(self.catalog.blob_dir, d.sha256, d.data) for d in batch]

        new_images: list[tuple[int, np.ndarray]] = []
        new_crops: dict[str, list[tuple[int, np.ndarray]]] = {}
        store = self.catalog.store
        with self.catalog.write_lock(), store.transaction() as db:
            offset = 0
            for d, blob, vec, crops in zip(batch, blobs, image_vecs, crops_per_image, strict=True):
                product_id = store.upsert_product(db, d.record.sku, **d.record.metadata)
                if store.find_image(db, product_id, d.sha256) is not None:
                    report.skipped += 1  # another writer added it since we looked
                    offset += len(crops)
                    continue
                new = [NewCrop(pos, label, score, box, crop_vecs[offset + j])
                       for j, (pos, label, score, box, _) in enumerate(crops)]  # fmt: skip
                image_id, crop_ids = store.insert_image(
                    db, product_id, source=str(d.record.path), blob=blob, sha256=d.sha256,
                    width=d.image.width, height=d.image.height, vector=vec, crops=new,
                )  # fmt: skip
                new_images.append((image_id, vec))
                for cid, c in zip(crop_ids, new, strict=True):
                    new_crops.setdefault(c.position, []).append((cid, c.vector))
                offset += len(crops)
                report.added += 1
                report.crops += len(crop_ids)
                report.products.add(d.record.sku)
        # Vectors reach the indexes only after their rows committed.
        for position, pairs in [(None, new_images), *new_crops.items()]:
            if pairs:
                ids = np.array([p[0] for p in pairs], dtype=np.int64)
                self.catalog.add_vectors(position, ids, np.stack([p[1] for p in pairs]))

    def ingest(
        self,
        records: Iterable[CatalogRecord],
        progress: Callable[[int], None] | None = None,
        sync: bool = False,
    ) -> IngestReport:
        """Ingest ``records``. With ``sync``, images of the source's products that the source
        no longer lists are removed (a product update)."""
        start = time.perf_counter()
        report = IngestReport()
        records = list(records)
        batches_since_save = 0
        for offset in range(0, len(records), self.batch_size):
            chunk = records[offset : offset + self.batch_size]
            decoded = self._decode(self._known(chunk, report), report)
            if decoded:
                self._write_batch(decoded, report)
                batches_since_save += 1
            if batches_since_save >= self.save_every:
                with self.catalog.write_lock():
                    self.catalog.save_indexes()
                batches_since_save = 0
            if progress:
                progress(len(chunk))
        if sync:
            report.removed = self._sync(records)
        with self.catalog.write_lock():
            self.catalog.save_indexes()
        for source, reason in report.failed:
            log.warning("skipped %s: %s", source, reason)
        report.seconds = time.perf_counter() - start
        return report

    def _sync(self, records: Sequence[CatalogRecord]) -> int:
        wanted: dict[str, set[str]] = {}
        for record in records:
            try:
                data = record.read(self.limits)
            except ImageDecodeError:
                continue
            wanted.setdefault(record.sku, set()).add(hashlib.sha256(data).hexdigest())
        stale: list[int] = []
        for sku, shas in wanted.items():
            product = self.catalog.store.find_product(sku)
            if product is None:
                continue
            stale += [
                im.id for im in self.catalog.store.images_of(product.id) if im.sha256 not in shas
            ]
        if stale:
            self.catalog.remove_images(stale)
        return len(stale)
