"""Service configuration: one frozen dataclass, built by the CLI or by tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from snapshop.errors import ConfigError
from snapshop.images import pil_pixel_ceiling
from snapshop.search import DEFAULT_RANKING, check_flag, check_ranking

DEFAULT_API_KEY_ENV = "SNAPSHOP_API_KEY"
RANKING_ENV = "SNAPSHOP_RANKING"
FLIP_QUERY_ENV = "SNAPSHOP_FLIP_QUERY"
VERIFY_ENV = "SNAPSHOP_VERIFY"
THUMB_SIZES: tuple[int, ...] = (64, 128, 256, 512)
FORM_ROOM = 1024 * 1024  # a multipart body's form fields and part headers, beyond its images


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the HTTP service needs to know; limits apply to every upload.

    ``api_key`` None disables the write endpoints (they answer 403).
    """

    catalog_dir: Path | str  # a directory, or a server catalog's PostgreSQL URI
    model: str | None = None
    detector: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images_per_product: int = 20
    max_json_bytes: int = 1024 * 1024  # any body but an upload (PATCH's JSON)
    max_k: int = 100
    default_k: int = 12
    page_limit: int = 24
    max_page_limit: int = 200
    thumb_sizes: tuple[int, ...] = THUMB_SIZES
    max_concurrent_searches: int = 16
    queue_timeout_s: float = 10.0
    # A client that takes longer to send its request line and headers, goes this long without
    # sending a byte of a body it owes, or takes longer over its whole body gets a 408 and is
    # disconnected: a stalled client must not hold a connection (a file descriptor, a spooled
    # upload) for ever. Shutdown waits at most ``shutdown_timeout_s`` for requests in flight.
    header_timeout_s: float = 20.0
    body_idle_timeout_s: float = 20.0
    body_timeout_s: float = 300.0
    shutdown_timeout_s: float = 30.0
    # An upload or edit waits this long for another writer of the catalog (an ingest, a
    # reindex, a migration, another replica's write), then gets a 503 to retry.
    write_wait_s: float = 30.0
    search_threads: int | None = 1  # faiss OpenMP threads per search; None: faiss default
    embed_threads: int | None = None  # ONNX Runtime intra-op threads; None: its default
    # image-based results by "product" vector or best "image" (search.RANKINGS)
    ranking: str = field(default_factory=lambda: ranking_from_env())
    # image-based results from the photo's and its mirror's mean embedding (issue #20)
    flip_query: bool = field(default_factory=lambda: flip_query_from_env())
    # image-based results' top candidates re-ranked by spatial verification (snapshop.verify)
    verify: bool = field(default_factory=lambda: flag_from_env(VERIFY_ENV))

    def __post_init__(self) -> None:
        from snapshop.catalog.server import is_server_target

        if not is_server_target(self.catalog_dir):
            object.__setattr__(self, "catalog_dir", Path(self.catalog_dir))
        if self.api_key is not None and len(self.api_key) < 8:
            raise ConfigError("the API key must be at least 8 characters long")
        positive = (
            "max_upload_bytes",
            "max_pixels",
            "max_images_per_product",
            "max_json_bytes",
            "max_k",
            "default_k",
            "page_limit",
            "max_page_limit",
            "max_concurrent_searches",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer")
        for name in ("header_timeout_s", "body_idle_timeout_s", "body_timeout_s",
                     "shutdown_timeout_s", "write_wait_s"):  # fmt: skip
            value = float(getattr(self, name))
            if not 0 < value <= 86_400:  # also refuses NaN
                raise ConfigError(f"{name} must be a number of seconds in (0, 86400]")
        ceiling = pil_pixel_ceiling()
        if ceiling is not None and self.max_pixels > ceiling:
            raise ConfigError(f"max_pixels must be at most {ceiling} (PIL's own limit)")
        if not 1 <= self.default_k <= self.max_k:
            raise ConfigError("default_k must be between 1 and max_k")
        if not 1 <= self.page_limit <= self.max_page_limit:
            raise ConfigError("page_limit must be between 1 and max_page_limit")
        if not self.thumb_sizes or any(s < 16 or s > 2048 for s in self.thumb_sizes):
            raise ConfigError("thumb_sizes must be between 16 and 2048 pixels")
        object.__setattr__(self, "thumb_sizes", tuple(sorted(set(self.thumb_sizes))))
        check_ranking(self.ranking)
        check_flag("flip_query", self.flip_query)
        check_flag("verify", self.verify)

    @property
    def writes_enabled(self) -> bool:
        return self.api_key is not None

    @property
    def max_request_bytes(self) -> int:
        """Whole body of a product upload: every allowed image plus room for the form fields."""
        return self.max_upload_bytes * self.max_images_per_product + FORM_ROOM

    @property
    def max_search_request_bytes(self) -> int:
        """Whole body of a search: one image plus room for the form fields."""
        return self.max_upload_bytes + FORM_ROOM


def ranking_from_env(name: str = RANKING_ENV) -> str:
    """The ranking named by environment variable ``name`` ("product" when unset or empty)."""
    return os.environ.get(name, "").strip().lower() or DEFAULT_RANKING


def flip_query_from_env(name: str = FLIP_QUERY_ENV) -> bool:
    """Whether environment variable ``name`` turns query flip averaging on."""
    return flag_from_env(name)


def flag_from_env(name: str) -> bool:
    """Whether environment variable ``name`` turns an option on (1 / true / yes; 0 / false /
    no / unset: off, as a manifest's flags); any other value is a ConfigError."""
    from snapshop.data.sources import FALSE_WORDS, TRUE_WORDS

    word = os.environ.get(name, "").strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ConfigError(f"${name} must be one of 1, true, yes, 0, false, no; got {word!r}")


def api_key_from_env(name: str = DEFAULT_API_KEY_ENV) -> str | None:
    """The API key held in environment variable ``name`` (None when unset or empty)."""
    value = os.environ.get(name, "").strip()
    return value or None
