"""Product vectors against a brute-force mean over the store, through writes and crashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shop_helpers import add_image, fill_shop, mean_vectors, new_catalog, product_ids, stored, unit

from snapshop.catalog.catalog import open_catalog
from snapshop.product_vectors import CACHE_FILE, ProductVectors, mean_pool


def assert_matches_store(pv: ProductVectors, directory: Path) -> None:
    groups = {None: stored(directory, "images")}
    positions = {p for p in ("upper", "lower") if stored(directory, "crops", p)}
    groups.update({p: stored(directory, "crops", p) for p in positions})
    assert set(pv.positions()) == positions
    for position, entries in groups.items():
        want = mean_vectors(entries)
        ids, vecs = pv.vectors(position)
        assert ids.tolist() == sorted(want)
        for pid, vec in zip(ids.tolist(), vecs, strict=True):
            assert np.allclose(vec, want[pid], atol=1e-5)
        index = pv.index(position)
        assert sorted(index.ids().tolist()) == sorted(want)
        for pid, vec in zip(index.ids().tolist(), index.vectors(), strict=True):
            assert np.allclose(vec, want[pid], atol=1e-5)  # an index updated in place too


def test_mean_pool() -> None:
    vecs = np.array([[2, 0], [0, 1], [0, 3], [-1, 0]], np.float32)
    products, pooled = mean_pool(np.array([7, 7, 3, 9]), vecs)
    assert products.tolist() == [3, 7, 9]
    assert np.allclose(pooled, [[0, 1], [np.sqrt(0.5), np.sqrt(0.5)], [-1, 0]], atol=1e-6)
    # a product whose images cancel out keeps a zero vector, never NaN
    _, cancelled = mean_pool(np.array([1, 1]), np.array([[1, 0], [-1, 0]], np.float32))
    assert np.isfinite(cancelled).all()


def test_vectors_follow_every_write_incrementally(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 12, seed=1)
        pv = ProductVectors(catalog)
        assert_matches_store(pv, directory)
        assert (directory / "index" / CACHE_FILE).is_file()

        rng = np.random.default_rng(5)
        add_image(catalog, "p03", unit(rng)[0], {"lower": unit(rng)[0]})  # an image more
        add_image(catalog, "new", unit(rng)[0])  # a new product
        ids = product_ids(directory)
        catalog.remove_product(ids["p07"])
        catalog.remove_images(
            [r for r, (p, _) in stored(directory, "images").items() if p == ids["p02"]][:1]
        )
        assert pv.refresh()
        assert_matches_store(pv, directory)
        assert ids["p07"] not in pv.vectors()[0].tolist()
        assert not pv.refresh()  # nothing new
    finally:
        catalog.close()


def test_only_changed_products_are_recomputed(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 10, seed=2)
        ProductVectors(catalog)
        add_image(catalog, "p04", unit(np.random.default_rng(1))[0])
        read: list[int] = []
        original = catalog.store.iter_vectors

        def spy(table, dim, ids=None, **kw):
            read.extend(ids or [])
            return original(table, dim, ids=ids, **kw)

        monkeypatch.setattr(catalog.store, "iter_vectors", spy)
        pv = ProductVectors(catalog)  # loads the cache, reconciles the one new image
        p04 = product_ids(directory)["p04"]
        owners = {i: p for i, (p, _) in stored(directory, "images").items()}
        assert read and {owners[i] for i in read if i in owners} == {p04}
        assert_matches_store(pv, directory)
    finally:
        catalog.close()


@pytest.mark.parametrize("damage", ["garbage", "empty", "other_dim", "stale"])
def test_cache_is_only_a_cache(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 8, seed=4)
        ProductVectors(catalog)
        cache = directory / "index" / CACHE_FILE
        stale = cache.read_bytes()
        add_image(catalog, "p01", unit(np.random.default_rng(9))[0])
        ProductVectors(catalog)
        if damage == "garbage":
            cache.write_bytes(b"PK\x03\x04 not a zip")
        elif damage == "empty":
            cache.write_bytes(b"")
        elif damage == "stale":  # as if a crash had lost the save after the last ingest
            cache.write_bytes(stale)
        else:
            other = new_catalog(tmp_path / "other", dim=4)
            fill_shop(other, 2)
            ProductVectors(other)
            other.close()
            cache.write_bytes((tmp_path / "other" / "index" / CACHE_FILE).read_bytes())
    finally:
        catalog.close()
    reopened = open_catalog(directory)
    try:
        assert_matches_store(ProductVectors(reopened), directory)
    finally:
        reopened.close()


@pytest.mark.parametrize("index_kind", ["flat", "hnsw"])
def test_best_entries_match_brute_force(
    tmp_path: Path, index_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry each product shows: its best image (or crop) by raw inner product, read only
    for the products asked about; an unknown product is left out. An exact in-memory index
    scores them itself, without reading the store's vectors (issue #16)."""
    directory = tmp_path / "cat"
    catalog = new_catalog(directory, index_kind=index_kind)
    try:
        fill_shop(catalog, 15, seed=6)
        pv = ProductVectors(catalog)
        if index_kind == "flat":

            def refuse(*args: object, **kwargs: object) -> None:
                raise AssertionError("read the store's vectors")

            monkeypatch.setattr(catalog.store, "iter_vectors", refuse)
        rng = np.random.default_rng(3)
        for position, entries in ((None, stored(directory, "images")),
                                  ("upper", stored(directory, "crops", "upper"))):  # fmt: skip
            products = sorted({p for p, _ in entries.values()})
            asked = products[::2] + [10**9]
            got_ids, got_owners = pv.entries(asked, position)
            want_ids = [e for e, (p, _) in entries.items() if p in asked]
            assert sorted(got_ids.tolist()) == sorted(want_ids)
            assert all(entries[e][0] == p for e, p in zip(got_ids, got_owners, strict=True))
            for q in unit(rng, 3):
                want: dict[int, tuple[int, float]] = {}
                for entry, (product, vec) in sorted(entries.items()):
                    score = float(vec @ q)
                    if product in asked and (product not in want or score > want[product][1]):
                        want[product] = (entry, score)
                got = pv.best_entries(q, asked, position)
                assert set(got) == set(want)
                for product, (entry, score) in got.items():
                    assert entry == want[product][0]
                    assert score == pytest.approx(want[product][1], abs=1e-5)
        assert pv.best_entries(unit(rng)[0], []) == {}
    finally:
        catalog.close()


def test_refresh_without_saving_keeps_the_file(tmp_path: Path) -> None:
    """A searcher's per-query refresh reconciles in memory only; the next open reconciles
    the older file with the store."""
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 6, seed=8)
        pv = ProductVectors(catalog)
        cache = directory / "index" / CACHE_FILE
        saved = cache.read_bytes()
        add_image(catalog, "p02", unit(np.random.default_rng(4))[0])
        assert pv.refresh(save=False)
        assert cache.read_bytes() == saved
        assert_matches_store(pv, directory)
        assert_matches_store(ProductVectors(catalog, save=False), directory)
        assert cache.read_bytes() == saved
    finally:
        catalog.close()


def test_refresh_sees_writes_no_index_knows_yet(tmp_path: Path) -> None:
    """Another process's write reaches only the store: the refresh brings the catalog's
    indexes (whose ids it reads) up first."""
    from catalog_helpers import add_vectors

    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 5, seed=2)
        pv = ProductVectors(catalog)
        add_vectors(catalog, unit(np.random.default_rng(7), 2), sku="elsewhere")
        assert pv.refresh()
        assert_matches_store(pv, directory)
        assert product_ids(directory)["elsewhere"] in pv.vectors()[0].tolist()
    finally:
        catalog.close()
