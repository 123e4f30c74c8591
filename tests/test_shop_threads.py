"""The shop features (similar, duplicates, recommend, product vectors) on a catalog shared by
threads while it is written: every search of an index holds the catalog's read side, so no
write or refresh changes an index under it."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import race
from shop_helpers import DIM, fill_shop, new_catalog, product_ids, stored, unit

from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.catalog.store import NewCrop
from snapshop.duplicates import candidate_pairs
from snapshop.product_vectors import ProductVectors
from snapshop.recommend import neighbours
from snapshop.search import Searcher
from snapshop.similar import similar_products


class ToyEmbedder:
    """What a Searcher asks of an embedder before any photo is embedded."""

    model_id = "toy@000000000000"
    dim = DIM


def add_product(
    catalog: Catalog,
    sku: str,
    vectors: np.ndarray,
    known: dict[int, np.ndarray] | None = None,
    created: set[int] | None = None,
) -> None:
    """One write: an image (with an upper crop) per row of ``vectors``. ``known`` gets each
    image's vector and ``created`` the product's id before any index holds them."""
    with catalog.writing() as write:
        product = write.upsert_product(sku, title=sku, category="tops")
        if created is not None:
            created.add(product)
        for n, vec in enumerate(vectors):
            crop = NewCrop("upper", "top", 0.9, (0, 0, 4, 4), vec)
            sha = hashlib.sha256(f"{sku}/{n}".encode()).hexdigest()
            image_id, _ = write.insert_image(product, source=f"{sku}-{n}.jpg", blob=None,
                                             sha256=sha, width=4, height=4, vector=vec,
                                             crops=[crop])  # fmt: skip
            if known is not None:
                known[image_id] = vec


def remove_product(catalog: Catalog, sku: str) -> None:
    found = catalog.find_product(sku)
    if found is not None:
        with catalog.writing() as write:
            write.delete_product(found.id)


# --- 1. each feature searches under the read side ---------------------------------------------


class SearchProbe:
    """Wraps an index's ``search``: its first call records whether a write to the indexes,
    tried from another thread, has to wait (the probe writes once the search lets go)."""

    def __init__(self, catalog: Catalog, index: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.catalog, self.search = catalog, index.search
        self.held: list[bool] = []
        self.writer: threading.Thread | None = None
        monkeypatch.setattr(index, "search", self.probed)

    def probed(self, *args: Any, **kwargs: Any) -> Any:
        if not self.held:
            wrote = threading.Event()

            def write() -> None:
                with self.catalog.index_lock.write():
                    wrote.set()

            self.writer = threading.Thread(target=write, daemon=True)
            self.writer.start()
            self.held.append(not wrote.wait(0.2))
        return self.search(*args, **kwargs)

    def join(self) -> None:
        if self.writer is not None:
            self.writer.join(5)
            assert not self.writer.is_alive(), "the read side was never let go"


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Catalog]:
    catalog = new_catalog(tmp_path / "cat")
    fill_shop(catalog, 12, seed=5)
    yield catalog
    catalog.close()


@pytest.mark.parametrize("feature", ["similar", "duplicates", "neighbours", "best_entries"])
def test_searches_hold_the_read_side(
    shop: Catalog, feature: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write to the indexes waits while a feature searches one (it was let through: a flat
    index's id map could move under the search, or its vectors be freed)."""
    pv = ProductVectors(shop, save=False)
    query = unit(np.random.default_rng(0))[0]
    work: dict[str, Callable[[], object]] = {
        "similar": lambda: similar_products(shop, "p03", 5, refresh=False),
        "duplicates": lambda: candidate_pairs(shop, 0.5, batch_size=8),
        "neighbours": lambda: list(neighbours(pv, 3, batch_size=4)),
        "best_entries": lambda: pv.best_entries(query, [1, 2, 3]),
    }
    probe = SearchProbe(shop, pv.index(None) if feature == "neighbours" else shop.index(None),
                        monkeypatch)  # fmt: skip
    try:
        work[feature]()
    finally:
        probe.join()
    assert probe.held == [True]


# --- 2. a refresh of the product vectors waits for a search that reads them --------------------


def test_product_vector_refresh_waits_for_a_search_without_deadlock(tmp_path: Path) -> None:
    """A search holds the read side, then asks the product vectors for entries (as a
    product-ranked photo search does) while their refresh has another process's write to
    bring in. The refresh used to hold the product vectors' lock while it waited for the
    read side, and the search waited for that lock: neither ever went on."""
    catalog = new_catalog(tmp_path / "cat")
    fill_shop(catalog, 6, seed=2)
    pv = ProductVectors(catalog, save=False)
    other = open_catalog(tmp_path / "cat")
    add_product(other, "elsewhere", unit(np.random.default_rng(3), 2))
    other.close()
    reading = threading.Event()
    seen: list[int] = []

    def search() -> None:
        with catalog.reading():
            reading.set()
            time.sleep(0.3)  # the refresh is waiting for this search now
            seen.append(len(pv.entries([1])[0]))

    def refresh() -> None:
        reading.wait(5)
        pv.refresh(save=False)

    threads = [threading.Thread(target=search, daemon=True),
               threading.Thread(target=refresh, daemon=True)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    stuck = any(t.is_alive() for t in threads)
    if not stuck:  # closing would wait for the stuck threads' locks
        catalog.close()
    assert not stuck, "deadlock"
    assert seen and seen[0] > 0
    assert product_ids(tmp_path / "cat")["elsewhere"] in pv.vectors()[0].tolist()


# --- 3. everything at once, checked against the stored vectors ---------------------------------


def close_to_one_of(score: float, queries: np.ndarray, vector: np.ndarray) -> bool:
    return bool(np.min(np.abs(queries @ vector - score)) < 1e-4)


def test_shop_features_survive_writes_and_refreshes(tmp_path: Path) -> None:
    """Threads run more-like-this, the duplicate scan, the similar-products batches, the
    shown-image lookup and a product-ranked search on one catalog while it is written through
    itself and through a second catalog object (which only a refresh brings in), and the
    product vectors are refreshed. Every score returned must be the inner product of the
    vectors it names (an index read mid-change pairs one entry's id with another's score, or
    reads freed memory); no thread may fail or hang; once the writes stop, the results match
    a brute force over the stored vectors."""
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    fill_shop(catalog, 20, seed=7)
    known = {i: v for i, (_, v) in stored(directory, "images").items()}
    created = set(product_ids(directory).values())
    skus = sorted(product_ids(directory))
    searcher = Searcher(catalog, ToyEmbedder(), ranking="product")  # type: ignore[arg-type]
    searcher.auto_refresh = False
    pv = searcher.product_vectors  # refreshed in place below while threads search it
    other = open_catalog(directory)
    stop = threading.Event()
    errors: list[BaseException] = []

    def looped(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                while not stop.is_set():
                    work()
            except BaseException as exc:  # reported below, with the others
                errors.append(exc)
                stop.set()

        return run

    def writer(target: Catalog, prefix: str, seed: int) -> Callable[[], None]:
        rng = np.random.default_rng(seed)
        rounds = iter(range(10**9))

        def write() -> None:
            batch = [f"{prefix}{next(rounds)}" for _ in range(6)]
            for sku in batch:
                add_product(target, sku, unit(rng, 8), known, created)
            for sku in batch:
                remove_product(target, sku)

        return write

    def similar() -> None:
        for sku in skus[:6]:
            own = catalog.find_product(sku)
            assert own is not None
            queries = np.stack([known[i.id] for i in catalog.store.images_of(own.id)])
            for hit in similar_products(catalog, sku, 8, refresh=False).image_results:
                assert hit.product_id != own.id
                assert close_to_one_of(hit.score, queries, known[hit.image_id])

    def duplicates() -> None:
        for (a, b), score in candidate_pairs(catalog, 0.3, batch_size=16).items():
            assert abs(float(known[a] @ known[b]) - score) < 1e-4

    def batches() -> None:
        for batch, found, scores in neighbours(pv, 5, batch_size=8):
            assert set(batch.tolist()) | set(found[found >= 0].tolist()) <= created
            assert np.all(np.abs(scores[found >= 0]) <= 1 + 1e-4)

    def shown() -> None:
        query = unit(np.random.default_rng(11))[0]
        base = sorted(product_ids(directory).values())[:10]
        for product, (entry, score) in pv.best_entries(query, base).items():
            assert product in created
            assert abs(float(query @ known[entry]) - score) < 1e-4

    def ranked() -> None:
        hits = searcher.rank_products(unit(np.random.default_rng(12))[0], 10)
        assert len({h.product_id for h in hits}) == len(hits)

    def refresher() -> None:
        pv.refresh(save=False)
        catalog.refresh()

    work = [writer(catalog, "w", 1), writer(other, "o", 2), similar, duplicates, batches,
            shown, ranked, refresher]  # fmt: skip
    threads = [threading.Thread(target=looped(w), daemon=True) for w in work]
    race(threads, stop, 4.0)
    other.close()
    assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"

    # once the writes stop: a brute force over the store
    catalog.refresh()
    entries = stored(directory, "images")
    owner = {i: p for i, (p, _) in entries.items()}
    for sku in skus[:3]:
        target = product_ids(directory)[sku]
        queries = np.stack([v for p, v in entries.values() if p == target])
        best: dict[int, float] = {}
        for p, v in entries.values():
            if p != target:
                best[p] = max(best.get(p, -2.0), float(np.max(queries @ v)))
        want = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        got = similar_products(catalog, sku, 8, refresh=False).image_results
        assert [h.product_id for h in got] == [p for p, _ in want]
        assert np.allclose([h.score for h in got], [s for _, s in want], atol=1e-5)
    ids = sorted(entries)
    matrix = np.stack([entries[i][1] for i in ids])
    sims = matrix @ matrix.T

    def pairs_over(threshold: float) -> set[tuple[int, int]]:
        return {(ids[a], ids[b]) for a in range(len(ids)) for b in range(a + 1, len(ids))
                if sims[a, b] >= threshold and owner[ids[a]] != owner[ids[b]]}  # fmt: skip

    found = set(candidate_pairs(catalog, 0.3))
    assert pairs_over(0.3 + 1e-5) <= found <= pairs_over(0.3 - 1e-5)
    catalog.close()
