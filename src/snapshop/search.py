"""Query path: image -> detections -> embeddings -> image-based and item-based product results.

Image-based results rank products by their product vector (the mean of their normalised
image vectors, ``product_vectors``) by default, ``ranking="product"``: on grocery-dev it
found the right product first for 0.758 of the photos vs 0.696 by best image
(docs/benchmarks/shop.md). ``ranking="image"`` ranks each product by its best image. Either
way a result shows its product's best-matching image; the score is the one it was ranked by.
Item-based results rank products by their best garment crop.

``flip_query`` (off by default; issue #20) searches image-based results with the mean of the
photo's and its mirror's normalised embeddings: photo -> catalog R@1 +0.012 on grocery-dev's
folds in fp32, +0.004 (within noise) in bf16, for a second embedding per query that runs
beside the first (+16 ms p50 with detection; docs/benchmarks/retrieval.md). ``verify`` (off
by default) re-ranks the image-based top 10 by spatial verification of local features
(``snapshop.verify``): printed packaging, ≈ 60 ms a query.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.catalog.catalog import Catalog
from snapshop.catalog.store import Product
from snapshop.config import check_int, check_number
from snapshop.detect.base import Box, Detection, Detector, frame_crop, keep_best_per_position
from snapshop.errors import ConfigError, NotFoundError
from snapshop.images import DecodeLimits, ImageSource, load_image, original_size, scale_to_original
from snapshop.index.base import VectorIndex
from snapshop.index.filtering import IdFilter
from snapshop.models.embedder import Embedder
from snapshop.models.tta import mean_view, mirror
from snapshop.product_vectors import ProductVectors
from snapshop.verify import (
    CatalogFeatures,
    LocalFeatures,
    VerifyConfig,
    count_inliers,
    extract,
    verification_bonus,
)

MAX_K = 1000
RANKINGS = ("product", "image")
DEFAULT_RANKING = "product"


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a ConfigError naming the option ``name``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    return value


def check_k(k: object) -> int:
    """``k`` (results per list) as an int from 1 to :data:`MAX_K`, else a ConfigError."""
    return check_int("k", k, 1, MAX_K)


def check_ranking(ranking: str) -> str:
    """``ranking`` if it is one of :data:`RANKINGS`, else a ConfigError."""
    if ranking not in RANKINGS:
        raise ConfigError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
    return ranking


@dataclass(frozen=True)
class ProductFilter:
    """Keep only products in ``category`` and within [min_price, max_price]."""

    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None

    def __post_init__(self) -> None:
        if self.category is not None and not isinstance(self.category, str):
            raise ConfigError(f"category must be text, not {self.category!r}")
        for name in ("min_price", "max_price"):
            value = getattr(self, name)
            if value is not None:  # a float: what the catalog's databases compare prices as
                object.__setattr__(self, name, check_number(name, value, 0.0))
        if (
            self.min_price is not None
            and self.max_price is not None
            and self.min_price > self.max_price
        ):
            raise ConfigError("min_price is greater than max_price")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.category, self.min_price, self.max_price))

    def accepts(self, product: Product) -> bool:
        if self.category is not None and product.category != self.category:
            return False
        if self.min_price is not None and (product.price is None or product.price < self.min_price):
            return False
        return not (
            self.max_price is not None and (product.price is None or product.price > self.max_price)
        )


@dataclass(frozen=True)
class ProductHit:
    product_id: int
    sku: str
    title: str | None
    url: str | None
    price: float | None
    currency: str | None
    category: str | None
    score: float
    image_id: int
    crop_id: int | None = None
    crop_box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class ItemResult:
    """Item-based results for one detected (or user-drawn) garment."""

    position: str
    label: str
    score: float
    box: tuple[float, float, float, float]
    results: list[ProductHit]


@dataclass
class SearchResult:
    query_size: tuple[int, int]
    detections: list[Detection]
    image_results: list[ProductHit]
    item_results: list[ItemResult]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_size": list(self.query_size),
            "detections": [d.to_dict() for d in self.detections],
            "image_results": [asdict(h) for h in self.image_results],
            "item_results": [asdict(r) for r in self.item_results],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


def top_products(
    index: VectorIndex,
    query: NDArray[np.float32],
    k: int,
    owner_of: Callable[[list[int]], dict[int, int]],
    accept: Callable[[int], bool] | None = None,
    allowed: IdFilter | None = None,
) -> list[tuple[int, float, int]]:
    """Best-scoring entry per product: [(product_id, score, entry_id)], at most ``k``.

    Fetches 4k neighbours and widens until ``k`` distinct accepted products are found or the
    index is exhausted, so one product with many images never crowds out the others.
    ``allowed`` (entries of accepted products) is applied inside the search by indexes that
    can (``filters_inside``), so a selective filter needs no deep fetch; others fall back to
    ``accept`` on what they return.
    """
    total = len(index)
    if total == 0:
        return []
    inside = allowed is not None and getattr(index, "filters_inside", False)
    if inside:
        assert allowed is not None
        total = min(total, len(allowed))
        if total == 0:
            return []
        accept = None  # every entry the search returns is allowed
    fetch = min(total, max(4 * k, 16))
    while True:
        if inside:
            search: Any = index.search  # the protocol's search takes no filter
            hits = search(query.reshape(1, -1), fetch, allowed=allowed)
        else:
            hits = index.search(query.reshape(1, -1), fetch)
        ids = [int(i) for i in hits.ids[0] if i >= 0]
        scores = hits.scores[0][: len(ids)]
        owners = owner_of(ids)
        seen: dict[int, tuple[int, float, int]] = {}
        rejected: set[int] = set()
        for entry, score in zip(ids, scores, strict=True):
            product = owners.get(entry)
            if product is None or product in seen or product in rejected:
                continue
            if accept is not None and not accept(product):
                rejected.add(product)
                continue
            seen[product] = (product, float(score), entry)
            if len(seen) == k:
                break
        if len(seen) >= k or fetch >= total:
            return list(seen.values())
        fetch = min(total, fetch * 4)


class FilterResolver:
    """A product filter as the entry ids (image or crop ids, or product ids) an index may
    return: selected in the catalog's database by one join (``CatalogStore.entry_ids_where``),
    cached per (index, filter) until the store's generation moves (a product edit bumps it
    too)."""

    def __init__(self, catalog: Catalog, max_filters: int = 32) -> None:
        self.catalog = catalog
        self.max_filters = max_filters
        self._generation = -1
        self._filters: dict[tuple[str, ProductFilter], IdFilter] = {}
        self._lock = threading.Lock()

    def allowed(self, position: str | None, filters: ProductFilter) -> IdFilter | None:
        """Entries of ``position``'s index (None: images) whose product passes ``filters``."""
        from snapshop.catalog.catalog import index_name

        name = index_name(position)
        index = self.catalog.indexes.get(name)
        if index is None or not getattr(index, "filters_inside", False):
            return None
        store = self.catalog.store
        return self._cached(name, filters, lambda: store.entry_ids_where(position, *_sql(filters)))

    def allowed_products(
        self, product_ids: NDArray[np.int64], filters: ProductFilter, version: int
    ) -> IdFilter:
        """The ``product_ids`` (the keys of a product index as of its ``version``) whose
        product passes ``filters``."""
        store = self.catalog.store
        return self._cached(
            f"products@{version}", filters,
            lambda: np.intersect1d(product_ids, store.product_ids_where(*_sql(filters))),
        )  # fmt: skip

    def _cached(
        self, name: str, filters: ProductFilter, select: Callable[[], NDArray[np.int64]]
    ) -> IdFilter:
        with self._lock:
            generation = self.catalog.store.generation
            if generation != self._generation:
                self._filters.clear()
                self._generation = generation
            key = (name, filters)
            if key not in self._filters:
                if len(self._filters) >= self.max_filters:
                    self._filters.pop(next(iter(self._filters)))
                self._filters[key] = IdFilter.of(select(), key=(name, filters, generation))
            return self._filters[key]


def _sql(filters: ProductFilter) -> tuple[str | None, float | None, float | None]:
    return filters.category, filters.min_price, filters.max_price


class Searcher:
    """Answers queries against one catalog with one embedder and an optional detector.

    ``ranking``: how image-based results rank products, "product" (by product vector, the
    default) or "image" (by each product's best image); see the module docstring.
    ``flip_query``: image-based results from the photo's and its mirror's mean embedding.
    ``verify``: re-rank the image-based results' top candidates by spatial verification of
    local features (``snapshop.verify``; None: off).
    """

    def __init__(
        self,
        catalog: Catalog,
        embedder: Embedder,
        detector: Detector | None = None,
        limits: DecodeLimits = DecodeLimits(),
        ranking: str = DEFAULT_RANKING,
        flip_query: bool = False,
        verify: VerifyConfig | None = None,
    ) -> None:
        catalog.check_model(embedder.model_id)
        self.catalog = catalog
        self.embedder = embedder
        self.detector = detector
        self.limits = limits
        # Each search first picks up other writers' changes (``refresh``: it waits for the
        # searches in flight). A host that refreshes at its own moments (the service) turns
        # this off.
        self.auto_refresh = True
        self.filter_resolver = FilterResolver(catalog)
        self._product_vectors: ProductVectors | None = None
        self._pv_lock = threading.Lock()
        self.ranking = ranking
        self.flip_query = flip_query
        self._catalog_features: CatalogFeatures | None = None
        self.verify = verify

    @property
    def verify(self) -> VerifyConfig | None:
        return self._verify

    @verify.setter
    def verify(self, config: VerifyConfig | None) -> None:
        if config is not None and not isinstance(config, VerifyConfig):
            raise ConfigError(f"verify must be a VerifyConfig or None, not {config!r}")
        self._verify = config
        if config is None:
            self._catalog_features = None
        elif self._catalog_features is None or self._catalog_features.config != config:
            self._catalog_features = CatalogFeatures(self.catalog, config)

    def verified(self, hits: list[ProductHit], query: LocalFeatures, k: int) -> list[ProductHit]:
        """The first ``verify.top_k`` of ``hits`` re-ranked by their score plus the bonus of
        their shown image's inliers with ``query``, then the rest; the first ``k``."""
        config, features = self._verify, self._catalog_features
        if config is None or features is None:
            return hits[:k]
        head, tail = hits[: config.top_k], hits[config.top_k :]
        inliers = np.zeros(len(head), np.int64)
        for i, hit in enumerate(head):
            try:
                shown = self.catalog.store.get_image(hit.image_id)
            except NotFoundError:  # deleted since the search: it keeps its score
                continue
            inliers[i] = count_inliers(query, features.of(shown), config)
        bonus = verification_bonus(inliers, config)
        fused = [replace(h, score=h.score + float(b)) for h, b in zip(head, bonus, strict=True)]
        fused.sort(key=lambda h: -h.score)  # stable: ties keep the embedding's order
        return (fused + tail)[:k]

    @property
    def flip_query(self) -> bool:
        return self._flip_query

    @flip_query.setter
    def flip_query(self, value: bool) -> None:
        self._flip_query = check_flag("flip_query", value)

    @property
    def ranking(self) -> str:
        return self._ranking

    @ranking.setter
    def ranking(self, value: str) -> None:
        self._ranking = check_ranking(value)
        if value == "product":
            _ = self.product_vectors  # built now, not on the first query

    @property
    def product_vectors(self) -> ProductVectors:
        """The catalog's product vectors (loaded from their cache, or computed, on first use)."""
        with self._pv_lock:
            if self._product_vectors is None:
                self._product_vectors = ProductVectors(self.catalog)
            return self._product_vectors

    def refresh(self) -> None:
        """Pick up writes since the last refresh: the catalog's indexes, and the product
        vectors once they are in use (not saved here: the next open reconciles its cache).
        Both change in place, so this holds the catalog's index lock exclusively, once the
        searches in flight are done (and takes it only when the store moved)."""
        pv = self._product_vectors
        generation = self.catalog.generation
        if self.catalog.refreshed_generation == generation and (
            pv is None or pv.generation == generation
        ):
            return
        with self.catalog.index_lock.write():
            self.catalog.refresh()
            if pv is not None:
                pv.refresh(save=False)

    def _hits(self, found: list[tuple[int, float, int]], crops: bool = False) -> list[ProductHit]:
        """Hits for ``found`` [(product, score, entry)]; entries are crop ids when ``crops``."""
        products = self.catalog.store.products_by_ids([p for p, _, _ in found])
        crop_rows = self.catalog.store.crop_rows([e for _, _, e in found]) if crops else {}
        out = []
        for product_id, score, entry in found:
            p = products.get(product_id)
            if p is None or (crops and entry not in crop_rows):  # deleted meanwhile
                continue
            image_id, crop_id, box = entry, None, None
            if crops:
                crop_row = crop_rows[entry][0]
                image_id, crop_id, box = crop_row.image_id, entry, crop_row.box
            out.append(ProductHit(p.id, p.sku, p.title, p.url, p.price, p.currency, p.category,
                                  score, image_id, crop_id, box))  # fmt: skip
        return out

    def _accept(self, filters: ProductFilter | None) -> Callable[[int], bool] | None:
        if filters is None or not filters.active:
            return None
        cache: dict[int, bool] = {}
        store = self.catalog.store

        def accept(product_id: int) -> bool:
            if product_id not in cache:
                found = store.products_by_ids([product_id]).get(product_id)
                cache[product_id] = found is not None and filters.accepts(found)
            return cache[product_id]

        return accept

    def _allowed(self, position: str | None, filters: ProductFilter | None) -> IdFilter | None:
        if filters is None or not filters.active:
            return None
        return self.filter_resolver.allowed(position, filters)

    def rank_products(
        self,
        query: NDArray[np.float32],
        k: int,
        filters: ProductFilter | None = None,
        ranking: str | None = None,
    ) -> list[ProductHit]:
        """Image-based results for the query vector (D,): the top ``k`` products passing
        ``filters`` by ``ranking`` (None: the searcher's), each with its best-matching image.

        By product vector the filter is applied inside an exact search of the product index,
        so the result is the exact top ``k`` of the allowed products; the image shown is found
        among the returned products' own images only.
        """
        if check_ranking(ranking or self.ranking) == "image":
            with self.catalog.reading():  # no refresh or write changes the index meanwhile
                index = self.catalog.index(None)
                if index is None:
                    return []
                owners = functools.partial(self.catalog.owners, None)
                accept, allowed = self._accept(filters), self._allowed(None, filters)
                found = top_products(index, query, k, owners, accept, allowed)
            return self._hits(found)
        pv = self.product_vectors  # first: making them refreshes, which takes the write side
        with self.catalog.reading():  # ``refresh`` changes the product index under the other
            product_index = pv.index(None)
            allowed = None
            if filters is not None and filters.active:
                ids = pv.product_ids(None)
                allowed = self.filter_resolver.allowed_products(ids, filters, pv.generation)
            total = len(product_index) if allowed is None else len(allowed)
            if total == 0:
                return []
            hits = product_index.search(query.reshape(1, -1), min(k, total), allowed=allowed)
            ranked = [(int(p), float(s)) for p, s in zip(hits.ids[0], hits.scores[0], strict=True)
                      if p >= 0]  # fmt: skip
            shown = pv.best_entries(query, [p for p, _ in ranked])
        return self._hits([(p, s, shown[p][0]) for p, s in ranked if p in shown])

    def search(
        self,
        source: ImageSource | Image.Image,
        k: int = 10,
        *,
        detect: bool = True,
        position: str | None = None,
        box: Box | None = None,
        filters: ProductFilter | None = None,
        flip_query: bool | None = None,
    ) -> SearchResult:
        """Search with a whole image (image-based results) and its garments (item-based).

        ``box`` searches one user-drawn region instead of detecting (its position is
        ``position`` or, without one, every crop index is searched). ``position`` alone limits
        item-based results to that garment position. ``flip_query`` (None: the searcher's)
        ranks image-based results by the mean of the photo's and its mirror's embeddings.
        Kept as one function, the query path read top to bottom with its per-stage timings
        (decode, detect, embed, search).
        """
        k = check_k(k)
        flip = self.flip_query if flip_query is None else check_flag("flip_query", flip_query)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image = load_image(source, self.limits)  # a PIL image too: it gets the files' rules
        t1 = time.perf_counter()
        timings["decode"] = (t1 - t0) * 1e3
        if self.auto_refresh:
            self.refresh()

        # Boxes in and out are in the original file's pixels; a large image was decoded
        # reduced (images.load_image), so they are scaled on the way in and out.
        sx, sy = scale_to_original(image)
        photo_vector = self.embedder.submit(image)  # needs no boxes: runs beside detection
        # a user's box searches its region only: no image-based results for a mirror to help
        mirrored = self.embedder.submit(mirror(image)) if flip and box is None else None
        # local features while the embedder works (verification re-ranks image-based results)
        verify = self._verify if box is None else None
        t_verify = time.perf_counter()
        query_features = extract(image, verify) if verify is not None else None
        verify_ms = (time.perf_counter() - t_verify) * 1e3
        detections: list[Detection] = []
        regions: list[tuple[str, str, float, Box]] = []
        if box is not None:
            clipped = box.clip(*original_size(image))
            if clipped.width < 8 or clipped.height < 8:
                raise ConfigError("the box is empty or smaller than 8x8 pixels inside the image")
            regions.append((position or "box", "user_box", 1.0, clipped))
        elif detect and self.detector is not None:
            detections = [replace(d, box=d.box.scaled(sx, sy)) for d in self.detector.detect(image)]
            best = keep_best_per_position(detections)
            for pos, det in sorted(best.items()):
                if position is None or pos == position:
                    regions.append((pos, det.label, det.score, det.box))
        t2 = time.perf_counter()
        timings["detect"] = (t2 - t1) * 1e3

        mode = self.catalog.crop_mode
        cropped = [(r, frame_crop(image, r[3].scaled(1 / sx, 1 / sy), mode)) for r in regions]
        regions = [r for r, pixels in cropped if pixels is not None]
        if box is not None and not regions:  # 8x8 in the file, less in the reduced decode
            raise ConfigError(
                f"the box is too small once the photo is reduced to {image.width}x"
                f"{image.height} pixels for searching: draw a larger one"
            )
        crop_vectors = self.embedder.embed_images([p for _, p in cropped if p is not None])
        photo = photo_vector.result()
        if mirrored is not None:
            photo = mean_view(np.concatenate([photo, mirrored.result()]))[None]
        vectors = np.concatenate([photo, crop_vectors])
        t3 = time.perf_counter()
        timings["embed"] = (t3 - t2) * 1e3

        accept = self._accept(filters)
        store = self.catalog.store
        image_results: list[ProductHit] = []
        if box is None:
            wanted = k if verify is None else max(k, verify.top_k)
            image_results = self.rank_products(vectors[0], wanted, filters)
            if query_features is not None:
                t_verify = time.perf_counter()
                image_results = self.verified(image_results, query_features, k)
                verify_ms += (time.perf_counter() - t_verify) * 1e3

        item_results: list[ItemResult] = []
        for (pos, label, score, region_box), vec in zip(regions, vectors[1:], strict=True):
            targets = [pos] if pos != "box" else store.crop_positions()
            merged: list[tuple[int, float, int]] = []
            with self.catalog.reading():  # no refresh or write changes the indexes meanwhile
                for target in targets:
                    index = self.catalog.index(target)
                    if index is None:
                        continue
                    owners = functools.partial(self.catalog.owners, target)
                    allowed = self._allowed(target, filters)
                    merged += top_products(index, vec, k, owners, accept, allowed)
            best_of_product: dict[int, tuple[int, float, int]] = {}
            for item in sorted(merged, key=lambda t: -t[1]):
                best_of_product.setdefault(item[0], item)
            hits = self._hits(list(best_of_product.values())[:k], crops=True)
            item_results.append(ItemResult(pos, label, score, region_box.as_tuple(), hits))
        timings["search"] = (time.perf_counter() - t3) * 1e3
        if verify is not None:  # inside detect (the query's features) and search (matching)
            timings["verify"] = verify_ms
        timings["total"] = (time.perf_counter() - t0) * 1e3
        size = original_size(image)
        return SearchResult(size, detections, image_results, item_results, timings)
