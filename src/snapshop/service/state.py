"""What the app holds between requests: one searcher over one open catalog, and the locks
that let many searches run at once while a write (ingest, delete) changes the indexes alone:
the catalog's own :attr:`~snapshop.catalog.catalog.Catalog.index_lock`, which the catalog's
writes and refreshes take too."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from snapshop.catalog.catalog import ReadWriteLock as ReadWriteLock  # the catalog's, re-exported
from snapshop.data.sources import CatalogRecord
from snapshop.detect.base import serial_if_needed
from snapshop.images import DecodeLimits
from snapshop.ingest import Ingestor, IngestReport
from snapshop.search import Searcher
from snapshop.service.errors import ApiError
from snapshop.service.settings import ServiceSettings
from snapshop.verify import VerifyConfig


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
        self.catalog.write_wait_s = settings.write_wait_s
        # One lock for the indexes, the catalog's: its writes and refreshes take the write
        # side themselves, so a write by any path waits for the searches in flight.
        self.lock = self.catalog.index_lock
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

    # Writes take the catalog's write lock and then, for their index changes, the write side
    # of ``lock`` (searches wait for that, not for a whole ingest); holding ``lock`` around
    # them here would take the two the other way round.
    def ingest(self, records: list[CatalogRecord]) -> IngestReport:
        limits = DecodeLimits(max_pixels=self.settings.max_pixels,
                              max_bytes=self.settings.max_upload_bytes)  # fmt: skip
        ingestor = Ingestor(self.catalog, self.searcher.embedder, self.searcher.detector,
                            limits=limits)  # fmt: skip
        return ingestor.ingest(records)

    def remove_product(self, product_id: int) -> tuple[int, list[str]]:
        """Images removed, and warnings (a committed removal whose index files the disk
        refused is a success)."""
        with self.catalog.write_lock():  # no other write's save changes the warning meanwhile
            removed = self.catalog.remove_product(product_id)
            warning = self.catalog.unsaved_indexes
        return removed, [] if warning is None else [warning]
