"""Per-photo mapper threads (issue #16): photos decoded, detected and embedded side by side
while the writer commits the batch before; same catalog and report as one photo at a time."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import check_catalog_dir, db_rows, make_images
from PIL import Image

from snapshop import api
from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.data.sources import CatalogRecord, read_source
from snapshop.detect.base import LOWER, UPPER, Box, Detection
from snapshop.images import DecodeLimits
from snapshop.ingest import Embedded, Fresh, Ingestor, IngestReport, PrepareJob, prepare
from snapshop.models.embedder import Embedder

WAIT_S = 10  # how long a test waits for something that happens at once when the code is right


class HalvesDetector:
    """Boxes the top and the bottom half of every photo."""

    name = "halves"
    thread_safe = True

    def detect(self, image: Image.Image) -> list[Detection]:
        w, h = image.size
        return [
            Detection(Box(0.1 * w, 0.02 * h, 0.9 * w, 0.5 * h), "top", UPPER, 0.9),
            Detection(Box(0.1 * w, 0.5 * h, 0.9 * w, 0.98 * h), "trousers", LOWER, 0.8),
        ]


def ingest_with(
    catalog_dir: Path,
    records: list[CatalogRecord],
    embedder: Embedder,
    detector: Any,
    ingestor_type: type[Ingestor] = Ingestor,
    **options: Any,
) -> IngestReport:
    with create_catalog(
        catalog_dir, model_id=embedder.model_id, model_ref=str(embedder.model_dir),
        dim=embedder.dim,
    ) as catalog:  # fmt: skip
        return ingestor_type(catalog, embedder, detector, **options).ingest(records)


class MeetingDetector(HalvesDetector):
    """Waits (up to ``WAIT_S``) in each photo's detection for a second photo to be in
    detection too: only photos detected side by side meet."""

    def __init__(self) -> None:
        self.meeting = threading.Barrier(2, timeout=WAIT_S)
        self.met: list[bool] = []

    def detect(self, image: Image.Image) -> list[Detection]:
        try:
            self.meeting.wait()
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)
        return super().detect(image)


def test_photos_are_detected_side_by_side(tmp_path: Path, lite0_embedder: Embedder) -> None:
    make_images(tmp_path / "shop", n_products=2, per_product=2, size=64)
    detector = MeetingDetector()
    report = ingest_with(
        tmp_path / "cat", read_source(tmp_path / "shop"), lite0_embedder, detector,
        workers=0, mappers=2,
    )  # fmt: skip
    assert (report.added, report.crops) == (4, 8)
    assert detector.met == [True] * 4


class SeenDetector(HalvesDetector):
    """Counts the photos it has been shown (thread-safe)."""

    def __init__(self) -> None:
        self.seen = 0
        self.changed = threading.Condition()

    def detect(self, image: Image.Image) -> list[Detection]:
        with self.changed:
            self.seen += 1
            self.changed.notify_all()
        return super().detect(image)


def test_next_batch_is_mapped_while_one_is_written(
    tmp_path: Path, lite0_embedder: Embedder
) -> None:
    """While a batch commits, the mappers already detect photos of the next one: each commit
    (but the last) waits until the detector has seen a photo beyond the batch it writes."""
    make_images(tmp_path / "shop", n_products=3, per_product=4, size=64)
    records = read_source(tmp_path / "shop")
    detector = SeenDetector()
    beyond: list[bool] = []

    class WaitingWriter(Ingestor):
        written = 0

        def commit(self, batch: list[Embedded], report: IngestReport) -> None:
            WaitingWriter.written += len(batch)
            if WaitingWriter.written < len(records):
                with detector.changed:
                    beyond.append(
                        detector.changed.wait_for(
                            lambda: detector.seen > WaitingWriter.written, timeout=WAIT_S
                        )
                    )
            super().commit(batch, report)

    report = ingest_with(
        tmp_path / "cat", records, lite0_embedder, detector, WaitingWriter,
        batch_size=4, workers=0, mappers=2,
    )  # fmt: skip
    assert report.added == 12
    assert beyond == [True, True]


def test_one_mapper_thread_at_a_time_for_a_detector_not_thread_safe(
    tmp_path: Path, lite0_embedder: Embedder
) -> None:
    """A detector that does not declare ``thread_safe`` never sees two photos at once (its
    photos still meet nobody in detection), while its photos embed side by side."""
    make_images(tmp_path / "shop", n_products=2, per_product=2, size=64)

    class Unsafe(MeetingDetector):
        thread_safe = False

    detector = Unsafe()
    detector.meeting = threading.Barrier(2, timeout=0.5)  # never met: 4 x 0.5 s at most
    report = ingest_with(
        tmp_path / "cat", read_source(tmp_path / "shop"), lite0_embedder, detector,
        workers=0, mappers=2,
    )  # fmt: skip
    assert (report.added, report.crops) == (4, 8)
    assert detector.met == [False] * 4


def test_decode_workers_leave_the_decoding_to_the_mappers(
    tmp_path: Path, lite0_model_dir: Path
) -> None:
    """With mappers, a decode worker only reads, hashes and skips known images: the fresh
    image comes back as its bytes (small), not as decoded pixels, and is decoded once, by its
    mapper; without mappers the worker decodes it, as before."""
    make_images(tmp_path / "shop", n_products=1, per_product=1, size=64)
    (record,) = read_source(tmp_path / "shop")
    cat = api.open_or_create_catalog(
        tmp_path / "cat", Embedder(lite0_model_dir), str(lite0_model_dir)
    )
    try:
        for mappers, kind in ((2, Fresh), (0, "Decoded")):
            job = Ingestor(cat, Embedder(lite0_model_dir), mappers=mappers).prepare_job()
            outcome = prepare(job, record, cat, None)
            assert type(outcome).__name__ == getattr(kind, "__name__", kind)
        fresh = prepare(PrepareJob(DecodeLimits(), 224, True, decode=False), record, cat, None)
        assert isinstance(fresh, Fresh) and fresh.data == record.read()
    finally:
        cat.close()


def write_source(root: Path) -> list[CatalogRecord]:
    """Two batches of 4 holding: a corrupt file, a byte-identical copy in the same batch, a
    missing file, an already indexed image (after the first ingest) and fresh ones."""
    make_images(root / "shop", n_products=2, per_product=3, size=64)
    records = read_source(root / "shop")
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    copy = root / "copy.jpg"
    shutil.copy(records[0].path, copy)
    sku = records[0].sku
    return [
        records[0],
        CatalogRecord(sku, copy),
        CatalogRecord(sku, corrupt),
        records[1],
        CatalogRecord(sku, root / "missing.jpg"),
        *records[2:],
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_mapped_report_and_vectors_match_one_at_a_time(
    tmp_path: Path, lite0_embedder: Embedder, workers: int
) -> None:
    """Same report (failures in source order, with their reasons), same images, crops and
    vectors with mappers as one photo at a time, and the same on a re-run."""
    records = write_source(tmp_path)
    big = records * 5  # past 2 batches of 4, so decode workers run when asked for
    results = {}
    for mappers in (0, 2):
        cat = tmp_path / f"cat{mappers}"
        report = ingest_with(
            cat, big, lite0_embedder, HalvesDetector(), batch_size=4, workers=workers,
            mappers=mappers,
        )  # fmt: skip
        catalog = open_catalog(cat)
        try:
            again = Ingestor(catalog, lite0_embedder, HalvesDetector(), mappers=mappers).ingest(
                records
            )
        finally:
            catalog.close()
        results[mappers] = (report, again, check_catalog_dir(cat), vectors_of(cat))
    (report, again, counts, vectors), other = results[2], results[0]
    assert report.to_dict() | {"seconds": 0, "images_per_second": 0} == other[0].to_dict() | {
        "seconds": 0, "images_per_second": 0,
    }  # fmt: skip
    assert [Path(s).name for s, _ in report.failed] == ["corrupt.jpg", "missing.jpg"] * 5
    assert (report.added, report.crops, report.skipped) == (6, 12, 29)
    assert (again.added, again.skipped, len(again.failed)) == (0, 7, 2)
    assert counts == other[2] == {"products": 2, "images": 6, "crops": 12}
    assert vectors.keys() == other[3].keys()
    for key, vector in vectors.items():
        np.testing.assert_allclose(vector, other[3][key], atol=1e-5)


def vectors_of(catalog_dir: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """{(sku, image sha256, crop position or ""): vector} of a catalog."""
    images = db_rows(
        catalog_dir,
        "SELECT p.sku, i.sha256, '', i.vector FROM images i JOIN products p ON p.id = i.product_id",
    )
    crops = db_rows(
        catalog_dir,
        "SELECT p.sku, i.sha256, c.position, c.vector FROM crops c JOIN images i"
        " ON i.id = c.image_id JOIN products p ON p.id = i.product_id",
    )
    return {(s, h, pos): np.frombuffer(v, np.float32) for s, h, pos, v in images + crops}
