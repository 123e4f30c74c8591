"""/healthz and /v1/stats: is the service up, and what does it serve."""

from fastapi import APIRouter

from snapshop.service.dependencies import State
from snapshop.service.errors import error_responses
from snapshop.service.schemas import Health, StatsOut


def router() -> APIRouter:
    routes = APIRouter(tags=["service"])

    @routes.get("/v1/stats", response_model=StatsOut)
    def stats(state: State) -> StatsOut:
        settings = state.settings
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
        """Up, and the catalog reachable (a server catalog's database answering): 200;
        the database unreachable: 503 ``catalog_unavailable``."""
        counts = state.catalog.counts()
        return Health(status="ok", products=counts["products"], images=counts["images"])

    return routes
