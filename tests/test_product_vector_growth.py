"""Product vectors grown in place (appended entries and products, vectors replaced in place)
against a brute-force mean over the store, through random writes; and the arrays they hand out
staying as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shop_helpers import add_image, mean_vectors, new_catalog, product_ids, stored, unit

from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.product_vectors import CACHE_FILE, ProductVectors

POSITIONS = ("upper", "lower")


def reference(directory: Path) -> dict[str | None, dict[int, tuple]]:
    """{position (None: images): {entry id: (product, vector)}}, read straight from SQLite."""
    groups: dict[str | None, dict[int, tuple]] = {None: stored(directory, "images")}
    groups.update({p: stored(directory, "crops", p) for p in POSITIONS})
    return groups


def assert_matches(pv: ProductVectors, directory: Path) -> None:
    for position, entries in reference(directory).items():
        want = mean_vectors(entries)
        ids, vecs = pv.vectors(position)
        assert ids.tolist() == sorted(want)
        assert vecs.shape == (len(want), pv.dim)
        for pid, vec in zip(ids.tolist(), vecs, strict=True):
            assert np.allclose(vec, want[pid], atol=1e-5)
        index = pv.index(position)
        assert sorted(index.ids().tolist()) == sorted(want)
        for pid, vec in zip(index.ids().tolist(), index.vectors(), strict=True):
            assert np.allclose(vec, want[pid], atol=1e-5)
        products = sorted(want)
        by_product = [(e, p) for p in products for e, (o, _) in sorted(entries.items()) if o == p]
        found, owners = pv.entries(products, position)
        assert list(zip(found.tolist(), owners.tolist(), strict=True)) == by_product


def random_write(catalog: Catalog, directory: Path, rng: np.random.Generator, step: int) -> None:
    """One write: mostly uploads (to a new product, or to one there), sometimes a deletion
    of images or of a product, or images re-added with vectors deleted before."""
    skus = sorted(product_ids(directory))
    images = stored(directory, "images")
    roll = rng.random()
    if roll < 0.15 and images:
        doomed = rng.choice(sorted(images), size=min(len(images), int(rng.integers(1, 3))))
        catalog.remove_images(sorted({int(i) for i in doomed}))
    elif roll < 0.22 and skus:
        ids = product_ids(directory)
        catalog.remove_product(ids[skus[int(rng.integers(len(skus)))]])
    else:
        sku = f"s{step:03d}" if roll < 0.6 or not skus else skus[int(rng.integers(len(skus)))]
        for _ in range(int(rng.integers(1, 3))):
            crops = {p: unit(rng)[0] for p in POSITIONS if rng.random() < 0.5}
            # an upload re-using a deleted image's vector: same entry content, a new id
            vector = unit(rng)[0] if rng.random() < 0.8 or not images else (
                next(iter(images.values()))[1].copy())  # fmt: skip
            add_image(catalog, sku, vector, crops, sha256=f"{int(rng.integers(2**62)):064x}")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("log", ["change log", "full ids", "both"])
def test_random_writes_match_brute_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, log: str
) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    rng = np.random.default_rng(seed)
    try:
        for step in range(3):
            random_write(catalog, directory, rng, step)
        pv = ProductVectors(catalog)
        assert_matches(pv, directory)
        logged = catalog.store.entry_changes
        handed_out: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for step in range(3, 40):
            for _ in range(int(rng.integers(1, 3))):  # a refresh may see several writes
                random_write(catalog, directory, rng, step)
            by_log = log == "change log" or (log == "both" and step % 2 == 0)
            monkeypatch.setattr(
                catalog.store, "entry_changes", logged if by_log else (lambda since, until: None)
            )
            assert pv.refresh(save=step % 7 == 0)
            assert_matches(pv, directory)
            position = [None, *POSITIONS][step % 3]
            ids, vecs = pv.vectors(position)
            handed_out.append((ids, vecs, ids.copy(), vecs.copy()))
            for ids, vecs, ids_then, vecs_then in handed_out:  # later refreshes left them be
                assert np.array_equal(ids, ids_then)
                assert np.array_equal(vecs, vecs_then)

        # the cache file holds what is in memory, and loads back to it
        add_image(catalog, "last", unit(rng)[0], {"upper": unit(rng)[0]})
        assert pv.refresh(save=True)
        with np.load(directory / "index" / CACHE_FILE) as data:
            for name, group in pv._groups.items():
                assert np.array_equal(data[f"{name}.entry_ids"], group.entry_ids)
                assert np.array_equal(data[f"{name}.entry_owner"], group.entry_owner)
                assert np.array_equal(data[f"{name}.product_ids"], group.product_ids)
                assert np.array_equal(data[f"{name}.vectors"], group.vectors)
        with open_catalog(directory) as reopened:
            again = ProductVectors(reopened)
            assert again.generation == pv.generation
            assert_matches(again, directory)
    finally:
        catalog.close()


def test_an_upload_of_a_new_product_appends_without_copying(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    rng = np.random.default_rng(3)
    try:
        for n in range(5):
            add_image(catalog, f"p{n}", unit(rng)[0], {"upper": unit(rng)[0]})
        pv = ProductVectors(catalog)
        add_image(catalog, "first", unit(rng)[0], {"upper": unit(rng)[0]})
        assert pv.refresh(save=False)  # outgrows the arrays computed on open
        before = {p: pv.vectors(p) for p in (None, "upper")}
        add_image(catalog, "second", unit(rng)[0], {"upper": unit(rng)[0]})
        assert pv.refresh(save=False)
        assert_matches(pv, directory)
        for position, (ids, vecs) in before.items():
            now_ids, now_vecs = pv.vectors(position)
            assert len(now_ids) == len(ids) + 1
            # the rows there before were not copied: the new arrays extend the old ones
            assert np.shares_memory(now_vecs, vecs) and np.shares_memory(now_ids, ids)
    finally:
        catalog.close()


def test_a_product_recomputed_in_place_copies_only_what_was_handed_out(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    rng = np.random.default_rng(4)
    try:
        for n in range(5):
            add_image(catalog, f"p{n}", unit(rng)[0])
        pv = ProductVectors(catalog, save=False)
        ids, vecs = pv.vectors()
        then = vecs.copy()
        add_image(catalog, "p2", unit(rng)[0])  # a product there gains an image
        assert pv.refresh()
        assert_matches(pv, directory)
        assert np.array_equal(vecs, then)  # handed out before: copied, not changed
        _, copied = pv.vectors()
        assert not np.shares_memory(copied, vecs)
        group = pv._groups["images"]
        add_image(catalog, "p3", unit(rng)[0])
        add_image(catalog, "p4", unit(rng)[0])
        group.vectors_handed_out = False  # as if nobody had read them since
        buffer = group.vectors
        handed_ids = pv.product_ids()  # what a filtered search reads: ids only
        assert pv.refresh()
        recomputed = pv._groups["images"].vectors
        assert np.shares_memory(recomputed, buffer)  # nobody's but the group's: in place
        assert np.array_equal(handed_ids, pv.product_ids())
        assert_matches(pv, directory)
    finally:
        catalog.close()
