"""Batch ingest pipeline (issue #6): parallel decode workers, streaming, resume after kill -9."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import check_catalog_dir, db_rows, make_images
from PIL import Image

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.data.sources import CatalogRecord, read_source
from snapshop.detect.base import UPPER, Box, Detection
from snapshop.errors import IngestError
from snapshop.images import DecodeLimits
from snapshop.ingest import Decoded, Ingestor, PrepareJob, decode, embed_batch
from snapshop.models.embedder import Embedder


class CountingEmbedder(Embedder):
    """The real ONNX embedder, counting every image it embeds."""

    embedded = 0

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        CountingEmbedder.embedded += len(batch)
        return super().embed_arrays(batch)


def vectors_by_file(catalog_dir: Path) -> dict[tuple[str, str], tuple[np.ndarray, int, int]]:
    rows = db_rows(
        catalog_dir,
        "SELECT p.sku, i.sha256, i.vector, i.width, i.height FROM images i"
        " JOIN products p ON p.id = i.product_id",
    )
    return {(s, h): (np.frombuffer(v, np.float32), w, hh) for s, h, v, w, hh in rows}


def test_parallel_decode_matches_in_process(tmp_path: Path, lite0_model_dir: Path) -> None:
    make_images(tmp_path / "shop", n_products=6, per_product=6, size=80)
    # A corrupt file and a byte-identical duplicate inside one product.
    (tmp_path / "shop" / "demo-000" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    shutil.copy(tmp_path / "shop" / "demo-001" / "0.jpg", tmp_path / "shop" / "demo-001" / "x.jpg")
    records = read_source(tmp_path / "shop")
    assert len(records) == 38
    reports = {}
    for workers in (0, 2):
        cat = tmp_path / f"cat{workers}"
        reports[workers] = api.index_source(
            records, cat, model=str(lite0_model_dir), batch_size=8, workers=workers
        )
    seq, par = reports[0], reports[2]
    assert (par.added, par.skipped, len(par.failed)) == (seq.added, seq.skipped, len(seq.failed))
    assert par.added == 36 and par.skipped == 1
    assert [s for s, _ in par.failed] == [str(tmp_path / "shop" / "demo-000" / "broken.jpg")]
    a, b = vectors_by_file(tmp_path / "cat0"), vectors_by_file(tmp_path / "cat2")
    assert a.keys() == b.keys() and len(a) == 36
    for key, (vec, w, h) in a.items():
        np.testing.assert_allclose(vec, b[key][0], atol=1e-5)
        assert (w, h) == b[key][1:] == (80, 80)
    assert check_catalog_dir(tmp_path / "cat2") == {"products": 6, "images": 36, "crops": 0}
    for (blob,) in db_rows(tmp_path / "cat2", "SELECT blob FROM images"):
        assert (tmp_path / "cat2" / blob).is_file()
    # Searching the parallel catalog finds each stored image first.
    cat = open_catalog(tmp_path / "cat2")
    try:
        index = cat.index(None)
        assert index is not None
        ids, vecs = next(cat.store.iter_vectors("images", cat.dim, ids=index.ids().tolist()))
        assert (index.search(vecs, 1).ids[:, 0] == ids).all()
    finally:
        cat.close()


def test_source_is_streamed_with_bounded_prefetch(
    tmp_path: Path, lite0_model_dir: Path, lite0_embedder: Embedder
) -> None:
    make_images(tmp_path / "shop", n_products=8, per_product=10, size=48)
    records = read_source(tmp_path / "shop")
    pulled = 0
    pulled_at_batches: list[int] = []

    def source() -> Iterator[CatalogRecord]:
        nonlocal pulled
        for record in records:
            pulled += 1
            yield record

    catalog = api.open_or_create_catalog(tmp_path / "cat", lite0_embedder, str(lite0_model_dir))
    try:
        ingestor = Ingestor(catalog, lite0_embedder, batch_size=4, workers=2, prefetch_batches=2)
        report = ingestor.ingest(source(), progress=lambda n: pulled_at_batches.append(pulled))
    finally:
        catalog.close()
    assert report.added == 80
    # At most the batch being written plus the prefetch window was ever read ahead.
    window = 4 * (2 + 1)
    assert pulled_at_batches[0] <= 4 + window < 80
    assert all(p - 4 * (i + 1) <= window for i, p in enumerate(pulled_at_batches))


RESUMABLE = textwrap.dedent(
    """
    import sys, time
    from snapshop import api
    from snapshop.data.sources import read_source
    from snapshop.ingest import Decoded, Ingestor, PrepareJob, decode, embed_batch
    from snapshop.models.embedder import Embedder

    if __name__ == "__main__":  # decode workers re-import this file
        source, catalog_dir, model = sys.argv[1:4]
        embedder = Embedder(model)
        catalog = api.open_or_create_catalog(catalog_dir, embedder, model)
        ingestor = Ingestor(catalog, embedder, batch_size=4, workers=2)
        # Slow enough per batch that the parent's kill lands between commits.
        ingestor.ingest(read_source(source), progress=lambda n: time.sleep(0.3))
    """
)


def test_kill_9_resume_does_not_reembed(tmp_path: Path, lite0_model_dir: Path) -> None:
    make_images(tmp_path / "shop", n_products=8, per_product=6, size=64)
    total = 48
    cat = tmp_path / "cat"
    script = tmp_path / "ingest_job.py"
    script.write_text(RESUMABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "shop"), str(cat), str(lite0_model_dir)],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def stored() -> int:
        try:
            return len(db_rows(cat, "SELECT id FROM images"))
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 90
    try:
        while stored() < 8:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the ingest made no progress"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the ingest and its decode workers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = stored()
    assert 8 <= done < total, "the kill did not land mid-ingest"
    assert done % 4 == 0, "a batch committed partly"

    CountingEmbedder.embedded = 0
    embedder = CountingEmbedder(lite0_model_dir)
    catalog = open_catalog(cat)
    try:
        report = Ingestor(catalog, embedder, batch_size=4, workers=2).ingest(
            read_source(tmp_path / "shop")
        )
    finally:
        catalog.close()
    assert CountingEmbedder.embedded == total - done  # finished images were not re-embedded
    assert report.added == total - done and report.skipped == done
    assert check_catalog_dir(cat) == {"products": 8, "images": total, "crops": 0}


class WorkerKillingRecord(CatalogRecord):
    """A record whose decode worker dies reading it, as one the kernel kills for memory does."""

    def read(self, limits: DecodeLimits = DecodeLimits()) -> bytes:
        if multiprocessing.parent_process() is not None:
            os._exit(9)
        return super().read(limits)


def test_dead_decode_worker_is_one_clear_error(tmp_path: Path, lite0_model_dir: Path) -> None:
    make_images(tmp_path / "shop", n_products=4, per_product=6, size=48)
    records = read_source(tmp_path / "shop")
    doomed = records[13]
    records[13] = WorkerKillingRecord(doomed.sku, doomed.path)
    with pytest.raises(IngestError, match="decode worker process died") as info:
        api.index_source(
            records, tmp_path / "cat", model=str(lite0_model_dir), batch_size=4, workers=2
        )
    assert "run the ingest again" in str(info.value)
    # Whole batches before the dead worker's, nothing else (and no catalog if none committed).
    kept = check_catalog_dir(tmp_path / "cat")["images"] if (tmp_path / "cat").exists() else 0
    assert kept % 4 == 0 and kept <= 12
    report = api.index_source(
        tmp_path / "shop", tmp_path / "cat", model=str(lite0_model_dir), batch_size=4, workers=2
    )
    assert (report.added, report.skipped) == (24 - kept, kept)
    assert check_catalog_dir(tmp_path / "cat")["images"] == 24


@pytest.mark.parametrize("workers", [0, 2])
def test_rerun_skips_everything(tmp_path: Path, lite0_model_dir: Path, workers: int) -> None:
    make_images(tmp_path / "shop", n_products=4, per_product=6, size=48)
    api.index_source(
        tmp_path / "shop",
        tmp_path / "cat",
        model=str(lite0_model_dir),
        batch_size=4,
        workers=workers,
    )
    CountingEmbedder.embedded = 0
    catalog = open_catalog(tmp_path / "cat")
    try:
        report = Ingestor(
            catalog, CountingEmbedder(lite0_model_dir), batch_size=4, workers=workers
        ).ingest(read_source(tmp_path / "shop"))
    finally:
        catalog.close()
    assert (report.added, report.skipped, CountingEmbedder.embedded) == (0, 24, 0)


class ReadCountingRecord(CatalogRecord):
    """Counts the reads made in the ingesting process (decode workers read their own)."""

    main_process_reads = 0

    def read(self, limits: DecodeLimits = DecodeLimits()) -> bytes:
        if multiprocessing.parent_process() is None:
            ReadCountingRecord.main_process_reads += 1
        return super().read(limits)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_prepare_step_reads_each_known_image_once(
    tmp_path: Path, lite0_model_dir: Path, workers: int
) -> None:
    """Issue #17: in-process decoding and decode workers run the same prepare step, and the
    skip check is made once: a re-run with workers no longer reads every known image again
    in the ingesting process."""
    make_images(tmp_path / "shop", n_products=4, per_product=6, size=48)
    records = [ReadCountingRecord(r.sku, r.path) for r in read_source(tmp_path / "shop")]
    api.index_source(
        records, tmp_path / "cat", model=str(lite0_model_dir), batch_size=4, workers=workers
    )
    ReadCountingRecord.main_process_reads = 0
    report = api.index_source(records, tmp_path / "cat", batch_size=4, workers=workers)
    assert (report.added, report.skipped) == (0, 24)
    assert ReadCountingRecord.main_process_reads == (24 if workers == 0 else 0)


class BlockingEmbedder(Embedder):
    """Records whether a batch of photos started embedding (``embed_arrays``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.photos_started = threading.Event()

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        self.photos_started.set()
        return super().embed_arrays(batch)


class WaitingDetector:
    """Boxes the top half of each photo, after waiting (up to 10 s) for the batch's photos to
    start embedding: they can only start during detection if the ingest began them first."""

    name = "waiting"

    def __init__(self, started: threading.Event) -> None:
        self.started = started
        self.saw_embedding: list[bool] = []

    def detect(self, image: Image.Image) -> list[Detection]:
        self.saw_embedding.append(self.started.wait(timeout=10))
        w, h = image.size
        return [Detection(Box(0.1 * w, 0.05 * h, 0.9 * w, 0.5 * h), "top", UPPER, 0.9)]


def test_photos_are_embedded_beside_detection(tmp_path: Path, lite0_model_dir: Path) -> None:
    """Issue #16: a batch's photos need no boxes, so in a batch at once (``embed_batch``, the
    Ray actors' mapper) they embed while the detector runs; the vectors are the ones the
    serial path gives."""
    make_images(tmp_path / "shop", n_products=3, per_product=2)
    vectors = {}
    for name in ("beside", "serial"):
        embedder = BlockingEmbedder(lite0_model_dir, parallel=2 if name == "beside" else 0)
        started = threading.Event() if name == "serial" else embedder.photos_started
        if name == "serial":
            started.set()  # the reference: detection does not wait
        detector = WaitingDetector(started)
        job = PrepareJob(DecodeLimits(), embedder.input_size, keep_image=True)
        batch = []
        for record in read_source(tmp_path / "shop", []):
            data = record.read()
            decoded = decode(job, record, data, hashlib.sha256(data).hexdigest())
            assert isinstance(decoded, Decoded)
            batch.append(decoded)
        embedded = embed_batch(embedder, detector, "pad", batch)
        assert [len(e.crops) for e in embedded] == [1] * 6
        assert detector.saw_embedding == [True] * 6
        vectors[name] = {e.sha256: (e.vector, e.crops[0].vector) for e in embedded}
    assert vectors["beside"].keys() == vectors["serial"].keys()
    for key, (photo, crop) in vectors["beside"].items():
        np.testing.assert_allclose(photo, vectors["serial"][key][0], atol=1e-5)
        np.testing.assert_allclose(crop, vectors["serial"][key][1], atol=1e-5)
