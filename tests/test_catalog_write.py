"""``Catalog.writing()``: write lock, one transaction and the index bookkeeping in one place."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import make_images

from snapshop import api
from snapshop.catalog.catalog import Catalog, create_catalog, open_catalog
from snapshop.catalog.store import NewCrop
from snapshop.catalog.write import CatalogWrite
from snapshop.data.sources import read_source
from snapshop.ingest import Ingestor

DIM = 8


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = create_catalog(tmp_path / "c", model_id="m", model_ref="m", dim=DIM)
    yield cat
    cat.close()


def insert(
    write: CatalogWrite, sku: str, rng: np.random.Generator, crops: tuple[str, ...] = ()
) -> int:
    product_id = write.upsert_product(sku, title=sku)
    new = [NewCrop(p, "top", 0.9, (0, 0, 4, 4), unit(rng)[0]) for p in crops]
    image_id, _ = write.insert_image(
        product_id, source=f"{sku}.jpg", blob=None, sha256=f"{rng.integers(1 << 62):064x}",
        width=4, height=4, vector=unit(rng)[0], crops=new,
    )  # fmt: skip
    return int(image_id)


def test_a_write_commits_rows_and_reaches_the_indexes(catalog: Catalog) -> None:
    rng = np.random.default_rng(0)
    before = catalog.store.generation
    with catalog.writing() as write:
        first = insert(write, "a", rng, crops=("upper",))
        second = insert(write, "b", rng)
        assert write.find_image(write.upsert_product("a"), "0" * 64) is None
        assert len(catalog.index(None) or []) == 0  # nothing before the commit
    assert catalog.store.generation == before + 1
    assert sorted(catalog.index(None).ids().tolist()) == [first, second]  # type: ignore[union-attr]
    assert len(catalog.index("upper")) == 1  # type: ignore[arg-type]
    # the catalog knows its indexes are current: the next refresh has nothing to do
    assert catalog.refresh() is False


def test_a_crash_inside_commits_nothing(catalog: Catalog) -> None:
    rng = np.random.default_rng(1)
    with catalog.writing() as write:
        kept = insert(write, "kept", rng)
    generation = catalog.store.generation
    with pytest.raises(RuntimeError, match="crash"), catalog.writing() as write:
        insert(write, "lost", rng, crops=("lower",))
        write.delete_images([kept])
        raise RuntimeError("crash mid-batch")
    assert catalog.store.generation == generation
    assert catalog.store.find_product("lost") is None
    assert catalog.store.counts()["images"] == 1 and catalog.store.get_image(kept)
    assert catalog.index(None).ids().tolist() == [kept]  # type: ignore[union-attr]
    assert catalog.index("lower") is None
    assert catalog.refresh() is False  # still current: nothing moved
    # the lock was let go: another thread can write at once
    done = threading.Event()

    def other_writer() -> None:
        with catalog.writing() as write:
            insert(write, "next", np.random.default_rng(2))
        done.set()

    thread = threading.Thread(target=other_writer)
    thread.start()
    thread.join(timeout=30)
    assert done.is_set() and catalog.store.find_product("next") is not None


def test_deletes_through_a_write_leave_the_indexes(catalog: Catalog) -> None:
    rng = np.random.default_rng(3)
    with catalog.writing() as write:
        gone = insert(write, "gone", rng, crops=("upper",))
        stays = insert(write, "stays", rng, crops=("upper",))
    product = catalog.store.find_product("gone")
    assert product is not None
    with catalog.writing() as write:
        assert write.delete_product(product.id) == [gone]
    assert catalog.index(None).ids().tolist() == [stays]  # type: ignore[union-attr]
    assert len(catalog.index("upper")) == 1  # type: ignore[arg-type]
    assert catalog.refresh() is False


def test_ingest_batch_that_fails_mid_write_commits_nothing(
    tmp_path: Path, lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest writes each batch through ``writing()``: an error on the batch's second image
    leaves neither the first image's row nor its vector."""
    from snapshop.models.embedder import load_embedder

    images = make_images(tmp_path / "shop", n_products=2, per_product=1)
    api.index_source(tmp_path / "shop", tmp_path / "cat", model=str(lite0_model_dir),
                     detector="none", workers=0)  # fmt: skip
    make_images(tmp_path / "more", n_products=2, per_product=1, seed=7)
    calls = {"n": 0}
    real = CatalogWrite.insert_image

    def failing(self: CatalogWrite, *args: object, **kwargs: object) -> tuple[int, list[int]]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CatalogWrite, "insert_image", failing)
    with open_catalog(tmp_path / "cat") as catalog:
        generation = catalog.store.generation
        ingestor = Ingestor(catalog, load_embedder(str(lite0_model_dir)), None, workers=0)
        with pytest.raises(OSError, match="disk full"):
            ingestor.ingest(read_source(tmp_path / "more", []))
        assert calls["n"] == 2
        assert catalog.store.generation == generation
        assert catalog.store.counts()["images"] == len(images)
        assert len(catalog.index(None)) == len(images)  # type: ignore[arg-type]


def test_queries_and_metadata_update_on_the_catalog(catalog: Catalog) -> None:
    """The typed queries callers use instead of reaching into ``catalog.store``."""
    from snapshop.errors import NotFoundError

    rng = np.random.default_rng(4)
    with catalog.writing() as write:
        image_id = insert(write, "a", rng)
        insert(write, "b", rng)
    product = catalog.find_product("a")
    assert product is not None and catalog.get_product(product.id) == product
    assert [p.sku for p in catalog.list_products(after_id=0, limit=1)] == ["a"]
    assert [im.id for im in catalog.images_of(product.id)] == [image_id]
    assert catalog.get_image(image_id).sha256 == catalog.images_of(product.id)[0].sha256
    assert catalog.has_image(product.id, catalog.get_image(image_id).sha256)
    assert not catalog.has_image(product.id, "0" * 64)
    assert catalog.counts() == {"products": 2, "images": 2, "crops": 0}
    assert catalog.db_path.is_file()

    generation = catalog.generation
    updated = catalog.update_product(product.id, title="Renamed", price=9.5)
    assert (updated.title, updated.price, updated.sku) == ("Renamed", 9.5, "a")
    assert catalog.generation == generation + 1
    assert catalog.refresh() is False  # a metadata write leaves the indexes current
    with pytest.raises(NotFoundError, match="no product with id 999"):
        catalog.update_product(999, title="x")
    assert catalog.generation == generation + 1  # the failed update committed nothing
