"""/healthz and /v1/stats: is the service up, and what does it serve."""

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from fastapi import APIRouter

from snapshop.catalog.catalog import Catalog
from snapshop.errors import CatalogUnavailableError
from snapshop.service.dependencies import State
from snapshop.service.errors import error_responses
from snapshop.service.schemas import Health, StatsOut

# A load balancer's probe wants an answer in seconds: a stalled database is "unavailable" long
# before a query against it would time out.
HEALTH_TIMEOUT_S = 5.0


class HealthProbe:
    """The catalog's counts within a deadline, from one worker thread.

    A probe that times out leaves its query running; the probes after it wait on that same
    query instead of stacking more threads behind a database that does not answer."""

    def __init__(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="snapshop-healthz")
        self._lock = threading.Lock()
        self._pending: Future[dict[str, int]] | None = None

    def counts(self, catalog: Catalog) -> dict[str, int]:
        with self._lock:
            if self._pending is None or self._pending.done():
                self._pending = self._pool.submit(catalog.counts)
            pending = self._pending
        try:
            return pending.result(self.timeout)
        except TimeoutError:
            raise CatalogUnavailableError(
                f"{catalog.location}: catalog database did not answer the health probe"
                f" within {self.timeout:.0f} s"
            ) from None


def router() -> APIRouter:
    routes = APIRouter(tags=["service"])
    probe = HealthProbe()

    @routes.get("/v1/stats", response_model=StatsOut)
    def stats(state: State) -> StatsOut:
        settings = state.settings
        # The indexes listed are this replica's: brought up to the store first (a few change-
        # log rows), or a position another replica wrote first shows only after a search.
        state.ensure_fresh()
        info = state.catalog.info()
        return StatsOut(
            products=info["products"], images=info["images"], crops=info["crops"],
            index_kind=info["index_kind"], indexes=info["indexes"], dim=info["dim"],
            model_id=info["model_id"], model_card=state.searcher.embedder.card.to_dict(),
            detector=state.detector_name, generation=info["generation"],
            limits={"max_upload_bytes": settings.max_upload_bytes,
                    "max_pixels": settings.max_pixels, "max_k": settings.max_k,
                    "max_images_per_product": settings.max_images_per_product,
                    "thumb_sizes": list(settings.thumb_sizes),
                    "writes_enabled": settings.writes_enabled},
        )  # fmt: skip

    @routes.get("/healthz", response_model=Health, responses=error_responses(503))
    def healthz(state: State) -> Health:
        """Up, and the catalog reachable (a server catalog's database answering within
        :data:`HEALTH_TIMEOUT_S`): 200; else 503 ``catalog_unavailable``."""
        counts = probe.counts(state.catalog)
        return Health(status="ok", products=counts["products"], images=counts["images"])

    return routes
