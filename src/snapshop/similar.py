"""More like this: the products that look like a catalog product, from its stored vectors.

Nothing is re-embedded. A product's image vectors query the image index and its garment crop
vectors query the crop index of their position; a candidate product scores the best
similarity between any of the product's vectors and any of the candidate's (a photo search's
``ranking="image"``, with several query vectors instead of one). The product itself is never
a result.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Callable, Sequence
from typing import SupportsIndex

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.catalog import Catalog
from snapshop.catalog.store import CatalogStore, CropRow, Product
from snapshop.config import is_ascii_digits
from snapshop.errors import CatalogError, ConfigError
from snapshop.search import (
    ItemResult,
    ProductFilter,
    ProductHit,
    SearchResult,
    check_k,
    top_products,
)

Found = tuple[int, float, int]  # (product id, score, entry id: image id or crop id)


def find_product(store: CatalogStore, key: str | int) -> Product:
    """The product whose sku is ``key`` or, failing that, whose integer id it is (an int, or
    a string of digits that is no sku)."""
    if isinstance(key, bool | np.bool_) or not isinstance(key, str | SupportsIndex):
        raise ConfigError(
            f"a product is named by its sku (text) or its id (an integer), not {key!r}"
        )
    if isinstance(key, str):
        found = store.find_product(key)
        if found is not None:
            return found
        digits = key.strip()
        if not is_ascii_digits(digits):
            raise CatalogError(f"no product with sku {key!r}")
    try:
        return store.get_product(int(key) if isinstance(key, str) else operator.index(key))
    except CatalogError:
        raise CatalogError(f"no product with id or sku {key!r}") from None


def product_acceptor(
    store: CatalogStore, filters: ProductFilter | None, exclude: Sequence[int] = ()
) -> Callable[[int], bool] | None:
    """A cached ``accept(product_id)`` for ``top_products``: passes ``filters`` and is not in
    ``exclude``; None when it would accept everything."""
    excluded = frozenset(int(p) for p in exclude)
    active = filters is not None and filters.active
    if not active and not excluded:
        return None
    cache: dict[int, bool] = {}

    def accept(product_id: int) -> bool:
        if product_id in excluded:
            return False
        if not active:
            return True
        if product_id not in cache:
            found = store.products_by_ids([product_id]).get(product_id)
            cache[product_id] = found is not None and filters.accepts(found)  # type: ignore[union-attr]
        return cache[product_id]

    return accept


def product_hits(catalog: Catalog, found: Sequence[Found], crops: bool = False) -> list[ProductHit]:
    """ProductHits for ``found`` in its order; entries are crop ids when ``crops``. Products
    (or crops) deleted meanwhile are left out."""
    store = catalog.store
    products = store.products_by_ids([p for p, _, _ in found])
    crop_rows = store.crop_rows([e for _, _, e in found]) if crops else {}
    out = []
    for product_id, score, entry in found:
        p = products.get(product_id)
        if p is None or (crops and entry not in crop_rows):
            continue
        image_id, crop_id, box = entry, None, None
        if crops:
            crop = crop_rows[entry][0]
            image_id, crop_id, box = crop.image_id, entry, crop.box
        out.append(ProductHit(p.id, p.sku, p.title, p.url, p.price, p.currency, p.category,
                              float(score), image_id, crop_id, box))  # fmt: skip
    return out


def best_products(
    catalog: Catalog,
    position: str | None,
    queries: NDArray[np.float32],
    k: int,
    accept: Callable[[int], bool] | None,
) -> list[Found]:
    """Top ``k`` products by their best similarity to any of ``queries`` (Q, dim) in the
    image index (``position`` None) or a crop index; [(product, score, entry)], best first.

    Exact with an exact index: a product in the overall top k is in the top k of the query
    vector it scores best against, so merging each query's top k loses nothing.
    """
    owners = functools.partial(catalog.owners, position)
    best: dict[int, Found] = {}
    with catalog.reading():  # no refresh or write changes the index meanwhile
        index = catalog.index(position)
        if index is None or len(index) == 0 or len(queries) == 0:
            return []
        for vector in queries:
            for product, score, entry in top_products(index, vector, k, owners, accept):
                if product not in best or score > best[product][1]:
                    best[product] = (product, score, entry)
    # ties by product id, so the order does not depend on the order of the queries
    return sorted(best.values(), key=lambda t: (-t[1], t[0]))[:k]


def _vectors(catalog: Catalog, table: str, ids: list[int]) -> NDArray[np.float32]:
    parts = [v for _, v in catalog.store.iter_vectors(table, catalog.dim, ids=ids)]
    return np.concatenate(parts) if parts else np.zeros((0, catalog.dim), np.float32)


def similar_products(
    catalog: Catalog,
    product: str | int,
    k: int = 10,
    *,
    position: str | None = None,
    filters: ProductFilter | None = None,
    refresh: bool = True,
) -> SearchResult:
    """Image-based and item-based "more like this" for the catalog product ``product`` (sku
    or id), excluding the product itself.

    ``image_results``: products ranked by their best image-to-image similarity with any of
    the product's images. ``item_results``: one list per garment position the product has
    crops at (only ``position`` when given), ranked by crop-to-crop similarity; its label,
    score and box are those of the product's most confident crop there. ``query_size`` is
    the size of the product's first image; ``detections`` is empty (nothing is detected).
    ``refresh``: first pick up other writers' changes (a host that refreshes the catalog
    under its own lock, as the service does for searches, passes False).
    """
    k = check_k(k)
    t0 = time.perf_counter()
    if refresh:
        catalog.refresh()
    store = catalog.store
    target = find_product(store, product)
    images = store.images_of(target.id)
    crops: list[CropRow] = [c for image in images for c in store.crops_of_image(image.id)]
    positions = sorted({c.position for c in crops})
    if position is not None and position not in positions:
        raise CatalogError(
            f"product {target.sku!r} has no garment crop at position {position!r}"
            f" (it has: {', '.join(positions) or 'none'})"
        )
    accept = product_acceptor(store, filters, exclude=[target.id])

    image_results: list[ProductHit] = []
    if position is None:
        vectors = _vectors(catalog, "images", [i.id for i in images])
        image_results = product_hits(catalog, best_products(catalog, None, vectors, k, accept))

    item_results: list[ItemResult] = []
    for pos in positions if position is None else [position]:
        own = [c for c in crops if c.position == pos]
        vectors = _vectors(catalog, "crops", [c.id for c in own])
        found = best_products(catalog, pos, vectors, k, accept)
        shown = max(own, key=lambda c: (c.score, -c.id))
        item_results.append(ItemResult(pos, shown.label, shown.score, shown.box,
                                       product_hits(catalog, found, crops=True)))  # fmt: skip
    size = (images[0].width, images[0].height) if images else (0, 0)
    elapsed = (time.perf_counter() - t0) * 1e3
    timings = {"search": elapsed, "total": elapsed}
    return SearchResult(size, [], image_results, item_results, timings)
