"""Filters inside the search at every selectivity, the in-place scan of the allowed rows, and
the id map that costs no memory while catalog ids arrive in order (issue #15); every result is
checked against brute force on generated vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapshop.index import IdFilter, create_index, filtering, load_index, save_index
from snapshop.index.choose import index_memory_bytes
from snapshop.index.filtering import exact_top_k_at, inner_products_at

SELECTIVITIES = [0.5, 0.1, 0.01, 0.001]
N, DIM = 20_000, 32


def product_like(seed: int, n: int, dim: int, clusters: int = 200) -> np.ndarray:
    """Unit vectors with a power-law spectrum around many clusters (like image embeddings)."""
    sd = np.sqrt(1.0 / np.arange(1, dim + 1))
    sd = (sd / np.sqrt((sd**2).sum()) * np.sqrt(dim)).astype(np.float32)
    centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32) * sd
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)) * sd
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(
    ids: np.ndarray, vecs: np.ndarray, queries: np.ndarray, allowed: np.ndarray, k: int
) -> np.ndarray:
    keep = np.isin(ids, allowed)
    order = np.argsort(-(queries @ vecs[keep].T), axis=1, kind="stable")[:, :k]
    return ids[keep][order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


# --- the in-place scan ------------------------------------------------------------------------
@pytest.mark.parametrize("n_queries", [1, 3, 40])  # 40: the gathered BLAS path
def test_inner_products_at_reads_memory_mapped_rows_in_place(
    tmp_path: Path, n_queries: int
) -> None:
    vecs = product_like(1, 5000, 48)
    np.save(tmp_path / "v.npy", vecs)
    store = np.load(tmp_path / "v.npy", mmap_mode="r")
    rows = np.random.default_rng(2).choice(5000, 700, replace=False)  # unsorted, scattered
    queries = product_like(3, n_queries, 48)
    got = inner_products_at(store, rows, queries)
    np.testing.assert_allclose(got, queries @ vecs[rows].T, atol=1e-5)
    labels = rows * 10 + 7
    scores, ids = exact_top_k_at(store, rows, labels, queries, 5)
    want = labels[np.argsort(-(queries @ vecs[rows].T), axis=1, kind="stable")[:, :5]]
    np.testing.assert_array_equal(ids, want)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert inner_products_at(store, rows[:0], queries).shape == (n_queries, 0)


def test_inner_products_at_refuses_rows_outside_the_store() -> None:
    store = np.zeros((10, 4), np.float32)
    with pytest.raises(IndexError):
        inner_products_at(store, np.array([3, 10]), np.zeros((1, 4), np.float32))


# --- the id map --------------------------------------------------------------------------------
def test_id_map_follows_adds_removes_and_re_adds_like_a_dict() -> None:
    """A random life of an index (ids in order, out of order, re-added, removed, compacted);
    after every step each id finds its live node, and nothing else is found."""
    rng = np.random.default_rng(9)
    index = create_index("ivfpq", 8, nlist=4, pq_m=4, nprobe=4, train_min=10**9)
    reference: dict[int, np.ndarray] = {}
    next_id = 0
    for step in range(60):
        action = rng.integers(0, 4)
        if action == 0:  # new ids in increasing order (what a catalog does)
            ids = np.arange(next_id, next_id + rng.integers(1, 40), dtype=np.int64)
            next_id = int(ids[-1]) + 1
        elif action == 1 and reference:  # re-add some existing ids (an edited image)
            ids = rng.choice(list(reference), size=min(5, len(reference)), replace=False)
        elif action == 2 and reference:
            gone = rng.choice(list(reference), size=min(7, len(reference)), replace=False)
            assert index.remove(gone) == len(gone)
            for i in gone.tolist():
                reference.pop(i)
            continue
        else:  # old, never-seen ids added late (out of order)
            ids = np.array([10**6 + step * 3 + j for j in range(3)], dtype=np.int64)[::-1]
        vecs = product_like(step, len(ids), 8, clusters=5)
        index.add(ids, vecs)
        reference.update(zip(ids.tolist(), vecs, strict=True))
        if step == 40:
            index.compact()
            assert index._where.ordered == len(reference)  # compaction restores id order
            assert index._where.memory_bytes() == 0
        probe = np.array(sorted(reference) + [next_id + 5, 10**7], dtype=np.int64)
        nodes = index._where.lookup(probe, index._labels, index._alive)
        assert (nodes[-2:] == -1).all()
        np.testing.assert_array_equal(index._labels[nodes[:-2]], probe[:-2])
        assert index._alive[nodes[:-2]].all()
        stored = index._floats.take(nodes[:-2])
        np.testing.assert_array_equal(stored, np.stack([reference[i] for i in probe[:-2]]))
        assert len(index) == len(reference)


def test_ids_in_order_need_no_id_map_memory() -> None:
    """Catalog ids arrive increasing: the label array is the map (0 B a vector); 100 re-added
    ids cost 16 B each (well, a dict entry until the arrays are rebuilt)."""
    vecs = product_like(4, 3000, 16)
    index = create_index("ivfpq", 16, nlist=16, pq_m=8, nprobe=4)
    for s in range(0, 3000, 1000):
        index.add(np.arange(s, s + 1000, dtype=np.int64) * 3, vecs[s : s + 1000])
    assert index._where.memory_bytes() == 0 and index._where.ordered == 3000
    params = {"nlist": 16, "pq_m": 8, "nbits": 4}
    codes = index.memory_bytes() - index._floats.resident_bytes  # floats held until a save
    assert codes == pytest.approx(index_memory_bytes("ivfpq", 3000, 16, params))
    before = index.memory_bytes()
    index.add(np.arange(100, dtype=np.int64) * 3, vecs[:100])  # re-added: out of order
    assert index._where.memory_bytes() > 0
    assert index.memory_bytes() > before
    hits = index.search(vecs[:5], 1)
    np.testing.assert_array_equal(hits.ids[:, 0], np.arange(5) * 3)


def test_id_map_rebuilt_on_load_from_a_file_with_ids_out_of_order(tmp_path: Path) -> None:
    vecs = product_like(5, 2000, 16)
    ids = np.random.default_rng(6).choice(10**6, 2000, replace=False).astype(np.int64)
    index = create_index("ivfpq", 16, nlist=16, pq_m=8, nprobe=16)
    index.add(ids, vecs)
    save_index(index, tmp_path / "i.faiss")
    loaded, _ = load_index(tmp_path / "i.faiss")
    assert loaded._where.ordered < 2000 and loaded._where.memory_bytes() >= 16 * 1000
    np.testing.assert_array_equal(loaded.search(vecs[:20], 1).ids[:, 0], ids[:20])
    assert loaded.remove(ids[:10]) == 10 and len(loaded) == 1990


# --- filtered search at every selectivity ------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every kind, saved and reloaded (compressed kinds then scan memory-mapped floats) and
    then grown by 500 vectors held in memory: the allowed rows come from both parts."""
    base = tmp_path_factory.mktemp("filters")
    vecs = product_like(15, N, DIM)
    ids = np.arange(N, dtype=np.int64) * 2 + 1  # increasing, like catalog ids
    queries = product_like(16, 25, DIM)
    out: dict[str, Any] = {"ids": ids, "vecs": vecs, "queries": queries}
    for kind in ("flat", "hnsw", "hnsw_sq", "ivfpq"):
        params = {"nlist": 64, "pq_m": DIM // 2, "nprobe": 8} if kind == "ivfpq" else {}
        index = create_index(kind, DIM, **params)
        index.add(ids[:-500], vecs[:-500])
        save_index(index, base / f"{kind}.faiss")
        loaded, _ = load_index(base / f"{kind}.faiss")
        loaded.add(ids[-500:], vecs[-500:])
        out[kind] = loaded
    return out


@pytest.mark.parametrize("path", ["scan-allowed", "inside-index"])
@pytest.mark.parametrize("selectivity", SELECTIVITIES)
@pytest.mark.parametrize("kind", ["flat", "hnsw", "hnsw_sq", "ivfpq"])
def test_filtered_search_at_every_selectivity_matches_brute_force(
    saved: dict[str, Any],
    kind: str,
    selectivity: float,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exact when the allowed rows are scanned (any selectivity, forced here by a huge scan
    limit), recall@10 >= .95 through the index with a selector (forced by a zero limit)."""
    if path == "inside-index":
        monkeypatch.setattr(filtering, "EXACT_FILTER_BYTES", 0)
        monkeypatch.setattr(filtering, "EXACT_FILTER_MIN", 0)
    else:
        monkeypatch.setattr(filtering, "EXACT_FILTER_BYTES", 10**12)
    index, ids, vecs, queries = saved[kind], saved["ids"], saved["vecs"], saved["queries"]
    rng = np.random.default_rng(int(selectivity * 1e4))
    allowed = rng.choice(ids, size=max(10, int(selectivity * N)), replace=False)
    if selectivity == 0.01:  # some allowed rows among those added since the save
        allowed = np.unique(np.concatenate([allowed, ids[-3:]]))
    flt = IdFilter.of(allowed, key=("filters", kind, selectivity, path))
    k = 10
    hits = index.search(queries, k, allowed=flt)
    truth = brute_force(ids, vecs, queries, allowed, k)
    assert set(hits.ids.ravel().tolist()) <= set(allowed.tolist())
    assert (hits.ids >= 0).all()
    r = recall(hits.ids, truth)
    if kind == "flat" or path == "scan-allowed":
        np.testing.assert_array_equal(hits.ids, truth)
    else:
        assert r >= 0.95, r
    lookup = dict(zip(ids.tolist(), vecs, strict=True))
    for q, row_ids, row_scores in zip(queries, hits.ids, hits.scores, strict=True):
        np.testing.assert_allclose(row_scores, [lookup[i] @ q for i in row_ids], atol=1e-5)


# --- Milvus: filter expressions ------------------------------------------------------------------
@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("pymilvus", reason="needs pymilvus (pip install 'snapshop[milvus]')")
    pytest.importorskip("milvus_lite", reason="needs milvus-lite for the embedded server")
    return str(tmp_path_factory.mktemp("milvus") / "milvus.db")


@pytest.mark.server
@pytest.mark.parametrize(
    ("fraction", "max_topk", "path"),
    [
        (0.01, 16384, "one expression"),
        (0.6, 16384, "deep search kept to the allowed"),
        (0.15, 40, "expression chunks"),  # the deep search (40) holds too few allowed
    ],
)
def test_milvus_filters_by_expression_at_any_size(
    milvus_uri: str, fraction: float, max_topk: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Milvus Lite searches exactly, so the filtered top-k equals brute force whichever way
    the allowed set reaches it (expressions here hold at most 50 ids)."""
    from snapshop.index import milvus

    monkeypatch.setattr(milvus, "MAX_EXPR_IDS", 50)
    monkeypatch.setattr(milvus, "MAX_TOPK", max_topk)
    calls: list[str] = []
    real = milvus.MilvusIndex._search

    def spy(self: Any, queries: np.ndarray, limit: int, expression: str = "") -> Any:
        calls.append(expression)
        return real(self, queries, limit, expression)

    monkeypatch.setattr(milvus.MilvusIndex, "_search", spy)
    vecs = product_like(30, 2000, 16, clusters=30)
    ids = np.arange(100, 2100, dtype=np.int64)
    index = create_index("milvus", 16, uri=milvus_uri)
    try:
        index.add(ids, vecs)
        allowed = np.random.default_rng(31).choice(ids, int(fraction * 2000), replace=False)
        queries = product_like(32, 4, 16, clusters=30)
        hits = index.search(queries, 10, allowed=IdFilter.of(allowed))
        np.testing.assert_array_equal(hits.ids, brute_force(ids, vecs, queries, allowed, 10))
        expressions = [c for c in calls if c]
        if path == "one expression":
            assert len(calls) == 1 and len(expressions) == 1
        elif path == "deep search kept to the allowed":
            assert calls == [""]
        else:
            assert len(expressions) == int(np.ceil(len(allowed) / 50))
        assert (index.search(queries, 5, allowed=IdFilter.of([])).ids == -1).all()
    finally:
        index.drop()
