"""What the app holds between requests: one searcher over one open catalog, and the locks
that let many searches run at once while a write (ingest, delete) runs alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from snapshop.data.sources import CatalogRecord
from snapshop.detect.base import serial_if_needed
from snapshop.images import DecodeLimits
from snapshop.ingest import Ingestor, IngestReport
from snapshop.search import Searcher
from snapshop.service.errors import ApiError
from snapshop.service.settings import ServiceSettings
from snapshop.verify import VerifyConfig


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    The vector indexes are not safe to search while they are being modified, so searches
    hold the read side and anything that changes an index holds the write side.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def limit_search_threads(threads: int | None) -> None:
    """Cap faiss's OpenMP team for searches made on *this* thread (the setting is per thread).

    Requests already run in parallel threads; an OpenMP team inside each one oversubscribes
    the cores and spins. Measured on the shared 2-core dev machine (load average ~12): one
    exact search over 2,913 x 1280 took 135-161 ms with 2 OpenMP threads and 8-15 ms with 1.
    """
    if threads:
        import faiss

        if faiss.omp_get_max_threads() != threads:
            faiss.omp_set_num_threads(threads)


class ServiceState:
    """Holds the searcher (whose detector it wraps in a
    :class:`~snapshop.detect.base.SerialDetector` when needed)."""

    def __init__(self, settings: ServiceSettings, searcher: Searcher) -> None:
        self.settings = settings
        searcher.detector = serial_if_needed(searcher.detector)
        searcher.auto_refresh = False  # ensure_fresh refreshes under the write lock instead
        searcher.ranking = settings.ranking
        searcher.flip_query = settings.flip_query
        if settings.verify and searcher.verify is None:
            searcher.verify = VerifyConfig()
        elif not settings.verify:
            searcher.verify = None
        self.searcher = searcher
        self.catalog = searcher.catalog
        self.lock = ReadWriteLock()
        self._slots = threading.BoundedSemaphore(settings.max_concurrent_searches)
        self._seen_generation = -1

    @property
    def detector_name(self) -> str | None:
        det = self.searcher.detector
        return None if det is None else str(getattr(det, "name", type(det).__name__))

    @contextmanager
    def search_slot(self) -> Iterator[None]:
        """Bound concurrent searches; a request that waits too long gets a 429 to retry."""
        if not self._slots.acquire(timeout=self.settings.queue_timeout_s):
            raise ApiError(
                429, "too many searches in flight; retry in a moment", headers={"Retry-After": "1"}
            )
        try:
            yield
        finally:
            self._slots.release()

    def ensure_fresh(self) -> None:
        """Pick up writes made by other processes (e.g. `snapshop index` on the same catalog)
        under the write lock, so no search sees an index while it is being reconciled."""
        generation = self.catalog.generation
        if generation != self._seen_generation:
            with self.lock.write():
                self.searcher.refresh()
                self._seen_generation = generation

    @contextmanager
    def reading(self) -> Iterator[None]:
        limit_search_threads(self.settings.search_threads)
        self.ensure_fresh()
        with self.lock.read():
            yield

    def ingest(self, records: list[CatalogRecord]) -> IngestReport:
        with self.lock.write():
            limits = DecodeLimits(max_pixels=self.settings.max_pixels,
                                  max_bytes=self.settings.max_upload_bytes)  # fmt: skip
            ingestor = Ingestor(self.catalog, self.searcher.embedder, self.searcher.detector,
                                limits=limits)  # fmt: skip
            return ingestor.ingest(records)

    def remove_product(self, product_id: int) -> int:
        with self.lock.write():
            return self.catalog.remove_product(product_id)
