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
