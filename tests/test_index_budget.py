"""Issue #15: index choice by memory/latency budget, compressed kinds re-ranked exactly, recall
measured into the card, and filters applied inside the search; all against brute force."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import add_vectors
from typer.testing import CliRunner

from snapshop.catalog.catalog import create_catalog, open_catalog, reindex_catalog
from snapshop.cli import app
from snapshop.config import read_json, write_json
from snapshop.errors import CatalogError, VectorIndexError
from snapshop.index import IdFilter, create_index, filtering, load_index, save_index
from snapshop.index.choose import (
    IndexBudget,
    candidates,
    choose_index,
    index_memory_bytes,
    parse_bytes,
)
from snapshop.search import top_products

KINDS = ["flat", "hnsw", "hnsw_sq", "ivfpq"]
N, DIM = 20_000, 32


def product_like(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Unit vectors with a power-law spectrum around many clusters (like image embeddings)."""
    sd = np.sqrt(1.0 / np.arange(1, dim + 1))
    sd = (sd / np.sqrt((sd**2).sum()) * np.sqrt(dim)).astype(np.float32)
    centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32) * sd
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)) * sd
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_filtered(
    ids: np.ndarray, vecs: np.ndarray, queries: np.ndarray, allowed: np.ndarray, k: int
) -> np.ndarray:
    keep = np.isin(ids, allowed)
    sub_ids, sub = ids[keep], vecs[keep]
    order = np.argsort(-(queries @ sub.T), axis=1, kind="stable")[:, :k]
    return sub_ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def make(kind: str, dim: int) -> Any:
    if kind == "ivfpq":
        return create_index(kind, dim, nlist=64, pq_m=dim // 2, nprobe=8)
    return create_index(kind, dim)


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    rng = np.random.default_rng(15)
    vecs = product_like(rng, N, DIM, clusters=200)
    ids = rng.choice(10 * N, size=N, replace=False).astype(np.int64)
    queries = product_like(np.random.default_rng(16), 30, DIM, clusters=200)
    return {"ids": ids, "vecs": vecs, "queries": queries, "built": {}}


def built(data: dict[str, Any], kind: str) -> Any:
    if kind not in data["built"]:
        index = make(kind, DIM)
        index.add(data["ids"], data["vecs"])
        data["built"][kind] = index
    return data["built"][kind]


# --- filters inside the search ------------------------------------------------------------
@pytest.mark.parametrize(
    ("selectivity", "path"),
    # 10k allowed vectors (50 %) always go through the index at this dimension
    [
        (0.5, "inside-index"),
        (0.01, "inside-index"),
        (0.001, "inside-index"),
        (0.01, "scan-allowed"),
        (0.001, "scan-allowed"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_filtered_search_matches_exact_filtered_search(
    data: dict[str, Any], kind: str, selectivity: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same top-k as exact search over the allowed vectors (up to the index's recall),
    whether the allowed set is small enough to be scanned alone or goes through the index
    with a selector (forced here by setting the scan threshold to zero)."""
    if path == "inside-index":
        monkeypatch.setattr(filtering, "EXACT_FILTER_BYTES", 0)
        monkeypatch.setattr(filtering, "EXACT_FILTER_MIN", 0)
    index = built(data, kind)
    rng = np.random.default_rng(int(selectivity * 1e4))
    allowed = rng.choice(data["ids"], size=max(1, int(selectivity * N)), replace=False)
    flt = IdFilter.of(allowed, key=("test", selectivity, path))
    k = 10
    hits = index.search(data["queries"], k, allowed=flt)
    truth = exact_filtered(data["ids"], data["vecs"], data["queries"], allowed, k)
    assert set(hits.ids.ravel().tolist()) <= set(allowed.tolist())  # nothing else comes back
    assert (hits.ids >= 0).all()  # >= k allowed vectors exist: k results every time
    r = recall(hits.ids, truth)
    assert r >= (1.0 if kind == "flat" or path == "scan-allowed" else 0.95), r
    assert (np.diff(hits.scores, axis=1) <= 1e-5).all()
    again = index.search(data["queries"], k, allowed=flt)  # the cached selection answers alike
    np.testing.assert_array_equal(again.ids, hits.ids)


@pytest.mark.parametrize("kind", KINDS)
def test_filter_with_fewer_allowed_than_k_and_removed_ids(kind: str) -> None:
    rng = np.random.default_rng(3)
    vecs = product_like(rng, 3000, 16, clusters=40)
    ids = np.arange(3000, dtype=np.int64)
    index = make(kind, 16)
    index.add(ids, vecs)
    index.remove(ids[:100])
    flt = IdFilter.of([5, 50, 500, 2999])  # two of them removed
    hits = index.search(vecs[:3], 10, allowed=flt)
    for row in hits.ids:
        assert sorted(row[:2].tolist()) == [500, 2999] and (row[2:] == -1).all()
    assert (index.search(vecs[:3], 5, allowed=IdFilter.of([])).ids == -1).all()


class CountingIndex:
    """A FlatIndex that counts its searches."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0
        self.filters_inside = True

    def __len__(self) -> int:
        return len(self.inner)

    def search(self, queries: np.ndarray, k: int, allowed: IdFilter | None = None) -> Any:
        self.calls += 1
        return self.inner.search(queries, k, allowed=allowed)


def test_top_products_with_a_selective_filter_searches_once() -> None:
    """Today's over-fetch would widen 4x at a time through a crowd of rejected products; with
    the filter inside the search one call returns the right products."""
    rng = np.random.default_rng(4)
    vecs = product_like(rng, 5000, 16, clusters=20)
    index = CountingIndex(create_index("flat", 16))
    index.inner.add(np.arange(5000, dtype=np.int64), vecs)
    owner = {i: i // 5 for i in range(5000)}  # 1000 products, 5 images each
    wanted = set(range(0, 1000, 100))  # 10 products: 1% of the catalog
    allowed = IdFilter.of([i for i in range(5000) if owner[i] in wanted])
    query = vecs[4321]

    def owner_of(entries: list[int]) -> dict[int, int]:
        return {e: owner[e] for e in entries}

    found = top_products(index, query, 5, owner_of, allowed=allowed)  # type: ignore[arg-type]
    assert index.calls == 1
    scores = vecs @ query
    best: dict[int, float] = {}
    for e in allowed.ids.tolist():
        best[owner[e]] = max(best.get(owner[e], -9.0), float(scores[e]))
    want = sorted(best, key=lambda p: -best[p])[:5]
    assert [p for p, _, _ in found] == want
    slow = top_products(index.inner, query, 5, owner_of, accept=lambda p: p in wanted)
    assert [p for p, _, _ in slow] == want  # the accept path agrees


# --- compressed kinds: re-rank, persistence -------------------------------------------------
@pytest.mark.parametrize("kind", ["hnsw_sq", "ivfpq"])
def test_compressed_kinds_rerank_and_reload_memory_mapped(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vecs = product_like(rng, 4000, 32, clusters=60)
    ids = np.arange(10, 4010, dtype=np.int64)
    index = make(kind, 32)
    index.add(ids, vecs)
    assert index.trained
    q = product_like(np.random.default_rng(6), 20, 32, clusters=60)
    hits = index.search(q, 10)
    lookup = dict(zip(ids.tolist(), vecs, strict=True))
    for qv, row_ids, row_scores in zip(q, hits.ids, hits.scores, strict=True):
        # re-ranked: the scores are exact float inner products, not code distances
        np.testing.assert_allclose(row_scores, [lookup[i] @ qv for i in row_ids], atol=1e-5)
    path = tmp_path / "images.faiss"
    save_index(index, path)
    loaded, card = load_index(path)
    # saved float vectors are memory-mapped: resident memory is under float HNSW's
    assert card["kind"] == kind and card["memory_bytes"] < index_memory_bytes("hnsw", 4000, 32)
    assert isinstance(loaded._floats.base, np.memmap)
    np.testing.assert_array_equal(loaded.search(q, 10).ids, hits.ids)
    new = product_like(np.random.default_rng(7), 1, 32, clusters=60)
    loaded.add(np.array([1], np.int64), new)  # lands in memory until the next save
    assert loaded.search(new, 1).ids[0, 0] == 1
    save_index(loaded, path)  # replaces the file it is mapped from
    again, _ = load_index(path)
    assert len(again) == 4001 and again.search(new, 1).ids[0, 0] == 1


def test_ivf_with_many_lists_finds_them_through_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from snapshop.index import reranked

    monkeypatch.setattr(reranked, "HNSW_COARSE_MIN", 16)  # 4096 lists in production
    rng = np.random.default_rng(12)
    vecs = product_like(rng, 4000, 32, clusters=60)
    index = create_index("ivfpq", 32, nlist=32, pq_m=16, nprobe=8)
    index.add(np.arange(4000, dtype=np.int64), vecs)
    quantizer = reranked.faiss.downcast_index(
        reranked.faiss.extract_index_ivf(index._index).quantizer
    )
    assert "HNSW" in type(quantizer).__name__
    queries = product_like(np.random.default_rng(13), 20, 32, clusters=60)
    truth = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    assert recall(index.search(queries, 10).ids, truth) >= 0.95


def test_vectors_file_that_does_not_match_is_refused_and_rebuilt(tmp_path: Path) -> None:
    """A save interrupted between the vectors file and the index leaves them mismatched: the
    index refuses to load, and the catalog rebuilds it from its store."""
    cat = catalog_with_vectors(tmp_path / "c", 1500, 16)
    cat.reindex(IndexBudget(max_memory_bytes=60_000, max_query_ms=50))
    assert cat.index_kind == "ivfpq"
    want = sorted(cat.index(None).ids().tolist())
    cat.close()
    vec_file = tmp_path / "c" / "index" / "images.vectors.npy"
    np.save(vec_file, np.zeros((10, 16), np.float32))
    with pytest.raises(CatalogError, match="do not match"):
        load_index(tmp_path / "c" / "index" / "images.faiss")
    reopened = open_catalog(tmp_path / "c")
    try:
        assert reopened.index_kind == "ivfpq"
        assert sorted(reopened.index(None).ids().tolist()) == want
    finally:
        reopened.close()


def test_compressed_index_retrains_as_it_grows() -> None:
    rng = np.random.default_rng(8)
    vecs = product_like(rng, 9000, 16, clusters=50)
    index = create_index("hnsw_sq", 16, train_min=500)
    index.add(np.arange(400, dtype=np.int64), vecs[:400])
    assert not index.trained  # too few to train: exact
    assert index.search(vecs[:2], 1).ids[:, 0].tolist() == [0, 1]
    index.add(np.arange(400, 1000, dtype=np.int64), vecs[400:1000])
    assert index.trained and index._trained_on == 1000
    index.add(np.arange(1000, 9000, dtype=np.int64), vecs[1000:])
    assert index._trained_on == 9000  # grown 8x: trained again on the larger set


# --- the budgeted choice ----------------------------------------------------------------------
def test_parse_bytes() -> None:
    assert parse_bytes("2GB") == 2_000_000_000
    assert parse_bytes("512MiB") == 512 * 1024**2
    assert parse_bytes("1.5e9") == 1_500_000_000
    for bad in ("lots", "-1GB", "0", "2XB"):
        with pytest.raises(CatalogError, match="memory size"):
            parse_bytes(bad)


def test_choice_never_exceeds_the_memory_budget() -> None:
    for n in (1_000, 100_000, 1_000_000, 10_000_000, 100_000_000):
        for dim in (128, 256, 512, 1280):
            for memory in (50e6, 500e6, 2e9, 16e9):
                for ms in (1.0, 5.0, 50.0):
                    budget = IndexBudget(max_memory_bytes=int(memory), max_query_ms=ms)
                    try:
                        choice = choose_index(n, dim, budget)
                    except CatalogError:
                        smallest = min(
                            index_memory_bytes(k, n, dim, p) for k, p in candidates(n, dim)
                        )
                        assert smallest > memory  # refused only when nothing fits
                        continue
                    assert choice.memory_bytes <= memory
                    assert index_memory_bytes(choice.kind, n, dim, choice.params) <= memory


def test_choice_prefers_accuracy_within_budget() -> None:
    assert choose_index(10_000, 256).kind == "flat"
    assert choose_index(1_000_000, 256, IndexBudget(max_memory_bytes=None)).kind == "hnsw"
    # 1M x 512 in 100 MB (the target, 100 bytes a vector): only PQ codes fit
    choice = choose_index(1_000_000, 512, IndexBudget(max_memory_bytes=100_000_000, max_query_ms=5))
    assert choice.kind == "ivfpq" and 512 % choice.params["pq_m"] == 0
    assert choice.params["rerank"] >= 10  # always re-ranked
    sq = choose_index(1_000_000, 256, IndexBudget(max_memory_bytes=600_000_000, max_query_ms=5))
    assert sq.kind == "hnsw_sq"
    with pytest.raises(CatalogError, match="fits"):
        choose_index(10_000_000, 512, IndexBudget(max_memory_bytes=10_000_000))


# --- the catalog ------------------------------------------------------------------------------
def catalog_with_vectors(directory: Path, n: int, dim: int, kind: str = "auto") -> Any:
    vecs = product_like(np.random.default_rng(9), n, dim, clusters=max(10, n // 50))
    cat = create_catalog(directory, model_id="m", model_ref="m", dim=dim, index_kind=kind)
    add_vectors(cat, vecs)
    cat.refresh()
    with cat.write_lock():
        cat.save_indexes()
    return cat


def test_new_catalog_records_its_recall(tmp_path: Path) -> None:
    cat = catalog_with_vectors(tmp_path / "c", 300, 16)
    cat.close()
    card = read_json(tmp_path / "c" / "index" / "images.json")
    measured = card["measured"]
    assert measured["kind"] == "flat" and measured["recall_at_10"] == 1.0
    assert measured["count"] == 300 and measured["memory_bytes"] == 300 * (16 * 4 + 8)
    assert measured["p50_ms"] > 0


def test_reindex_by_budget_chooses_measures_and_persists(tmp_path: Path) -> None:
    cat = catalog_with_vectors(tmp_path / "c", 3000, 32)
    before = cat.index(None).search(cat.index(None).vectors()[:5], 10).ids
    cat.close()
    budget = IndexBudget(max_memory_bytes=200_000, max_query_ms=50)  # flat needs 408 kB
    report = reindex_catalog(tmp_path / "c", budget)
    assert report["kind"] == "ivfpq" and report["predicted_memory_bytes"] <= 200_000
    measured = report["indexes"]["images"]
    assert measured["recall_at_10"] >= 0.95 and measured["memory_bytes"] <= 200_000
    assert measured["count"] == 3000 and "nprobe" in measured["search_params"]
    card = read_json(tmp_path / "c" / "catalog.json")
    assert (
        card["index_kind"] == "auto"
        and card["index_params"]["budget"]["max_memory_bytes"] == 200_000
    )
    reopened = open_catalog(tmp_path / "c")
    try:
        assert reopened.index_kind == "ivfpq" and reopened.index(None).kind == "ivfpq"
        info = reopened.info()
        assert info["index_budget"]["max_memory_bytes"] == 200_000
        assert info["measured"]["images"]["recall_at_10"] == measured["recall_at_10"]
        after = reopened.index(None).search(reopened.index(None).vectors()[:5], 10).ids
        assert recall(after, before) >= 0.9
    finally:
        reopened.close()


def test_reindex_that_cannot_fit_changes_nothing(tmp_path: Path) -> None:
    cat = catalog_with_vectors(tmp_path / "c", 500, 16)
    cat.close()
    card = read_json(tmp_path / "c" / "catalog.json")
    with pytest.raises(CatalogError, match="fits"):
        reindex_catalog(tmp_path / "c", IndexBudget(max_memory_bytes=1000))
    assert read_json(tmp_path / "c" / "catalog.json") == card


def test_catalog_whose_budget_became_impossible_still_opens(tmp_path: Path) -> None:
    cat = catalog_with_vectors(tmp_path / "c", 500, 16)
    cat.close()
    path = tmp_path / "c" / "catalog.json"
    card = read_json(path)
    write_json(path, {**card, "index_params": {"budget": {"max_memory_bytes": 10}}})
    reopened = open_catalog(tmp_path / "c")
    try:
        assert reopened.index_kind == "ivfpq" and len(reopened.index(None)) == 500
    finally:
        reopened.close()


def test_cli_reindex_and_info(tmp_path: Path) -> None:
    cat = catalog_with_vectors(tmp_path / "c", 3000, 32)
    cat.close()
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "catalog",
            "reindex",
            "--catalog",
            str(tmp_path / "c"),
            "--memory",
            "200kB",
            "--max-ms",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "chose ivfpq" in result.stdout and "recall@10" in result.stdout
    info = json.loads(
        runner.invoke(app, ["catalog", "info", "--catalog", str(tmp_path / "c"), "--json"]).stdout
    )
    assert info["index_kind"] == "ivfpq" and info["measured"]["images"]["recall_at_10"] >= 0.95
    bad = runner.invoke(
        app, ["catalog", "reindex", "--catalog", str(tmp_path / "c"), "--memory", "lots"]
    )
    assert bad.exit_code == 1 and "memory size" in bad.stderr


def test_filter_resolver_follows_product_edits(tmp_path: Path) -> None:
    """A product filter becomes the entry ids of the products that pass it; an edit to a
    product (it bumps the store's generation) is seen by the next search."""
    from snapshop.search import FilterResolver, ProductFilter

    vecs = product_like(np.random.default_rng(10), 40, 16, clusters=4)
    cat = create_catalog(tmp_path / "c", model_id="m", model_ref="m", dim=16, index_kind="flat")
    images: dict[int, list[int]] = {}
    for p in range(4):
        ids = add_vectors(cat, vecs[p * 10 : p * 10 + 10], f"sku-{p}",
                          category="a" if p < 2 else "b", price=10.0 * (p + 1))  # fmt: skip
        images[cat.store.find_product(f"sku-{p}").id] = ids  # type: ignore[union-attr]
    cat.refresh()
    pids = sorted(images)
    try:
        resolver = FilterResolver(cat)
        first = resolver.allowed(None, ProductFilter(category="a"))
        assert first is not None
        assert first.ids.tolist() == sorted(images[pids[0]] + images[pids[1]])
        cheap = resolver.allowed(None, ProductFilter(min_price=25.0, max_price=35.0))
        assert cheap is not None and cheap.ids.tolist() == sorted(images[pids[2]])
        assert resolver.allowed(None, ProductFilter(category="a")) is first  # cached
        cat.store.update_product(pids[3], category="a")
        moved = resolver.allowed(None, ProductFilter(category="a"))
        assert moved is not None and moved.key != first.key
        assert moved.ids.tolist() == sorted(images[pids[0]] + images[pids[1]] + images[pids[3]])
        hits = cat.index(None).search(vecs[35:36], 5, allowed=moved)
        assert set(hits.ids[0].tolist()) <= set(moved.ids.tolist())
    finally:
        cat.close()


# --- PCA before the codes ------------------------------------------------------------------
def test_ivfpq_with_pca_reranks_from_the_full_vectors_and_reloads(tmp_path: Path) -> None:
    """Codes over 16 principal dimensions of 32-d vectors find the candidates; the scores are
    still exact 32-d inner products (re-ranked from the float vectors), recall stays high, and
    the projection travels with the saved index."""
    rng = np.random.default_rng(21)
    vecs = product_like(rng, 6000, 32, clusters=80)
    ids = np.arange(6000, dtype=np.int64)
    index = create_index("ivfpq", 32, nlist=64, pq_m=8, nprobe=16, pca=16)
    index.add(ids, vecs)
    q = product_like(np.random.default_rng(22), 40, 32, clusters=80)
    hits = index.search(q, 10)
    truth = np.argsort(-(q @ vecs.T), axis=1, kind="stable")[:, :10]
    assert recall(hits.ids, truth) >= 0.9
    np.testing.assert_allclose(
        hits.scores, np.take_along_axis(q @ vecs.T, hits.ids, axis=1), atol=1e-5
    )
    # the 16-d codes alone rank worse than after the exact re-rank: the re-rank is doing work
    coarse = index._index.search(q, 10)[1]
    assert recall(coarse, truth) < recall(hits.ids, truth)
    save_index(index, tmp_path / "p.faiss")
    loaded, card = load_index(tmp_path / "p.faiss")
    assert card["pca"] == 16
    np.testing.assert_array_equal(loaded.search(q, 10).ids, hits.ids)
    assert loaded.fixed_bytes() < create_index("ivfpq", 32, nlist=64, pq_m=8).fixed_bytes() * 2
    with pytest.raises(VectorIndexError, match="pca"):
        create_index("ivfpq", 32, pca=32)
    with pytest.raises(VectorIndexError, match="pq_m must divide the dimension 12"):
        create_index("ivfpq", 32, pca=12, pq_m=8)
