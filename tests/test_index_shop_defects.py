"""A fourth adversarial round: the memory-budget indexes and the shop features
(docs/benchmarks/reliability.md). Each test failed on the code before its fix."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from PIL import Image
from shop_helpers import add_image, fill_shop, new_catalog, stored_file

from snapshop import api, recommend
from snapshop.catalog.catalog import open_catalog
from snapshop.duplicates import find_duplicates
from snapshop.errors import VectorIndexError
from snapshop.index import IdFilter, create_index, filtering, load_index, save_index
from snapshop.index.choose import (
    IndexBudget,
    choose_index,
    index_memory_bytes,
    resolve_index_kind,
)
from snapshop.index.hnsw import HNSWIndex
from snapshop.recommend import export_similar

DIM = 16
SMALL_TRAIN = {"hnsw_sq": {"train_min": 50}, "ivfpq": {"train_min": 50, "nlist": 4, "pq_m": 8}}


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- searches -----------------------------------------------------------------------------
class ReusesFreedBitmaps:
    """Stands for the faiss graph: before each search it does what another thread might
    (``meanwhile``), then allocates arrays of ones the size of the index's node bitmap, which
    numpy serves from the blocks it freed last. A selector whose bitmap was freed then lets
    every node through."""

    def __init__(self, graph: Any, bitmap_bytes: int, meanwhile: Any = None) -> None:
        self.graph, self.bitmap_bytes, self.meanwhile = graph, bitmap_bytes, meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)

    def search(self, queries: np.ndarray, k: int, params: Any = None) -> Any:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        junk = [np.full(self.bitmap_bytes, 255, np.uint8) for _ in range(64)]
        found = self.graph.search(queries, k, params=params)
        del junk
        return found


def test_hnsw_filter_never_leaks_through_a_freed_bitmap(monkeypatch: pytest.MonkeyPatch) -> None:
    # A filter without a cache key (or evicted from the cache by other filters meanwhile) had
    # its node bitmap freed before the graph walk read it: products of other categories came
    # back (92 of 200 results here).
    monkeypatch.setattr(filtering, "EXACT_FILTER_MIN", 8)  # through the graph, not a scan
    monkeypatch.setattr(filtering, "EXACT_FILTER_BYTES", 8)
    n = 4000
    vectors = unit(n)
    index = HNSWIndex(DIM)
    index.add(np.arange(n), vectors)
    index._index = ReusesFreedBitmaps(index._index, n // 8)
    hits = index.search(vectors[1:41:2], 10, allowed=IdFilter.of(np.arange(0, n, 2)))
    assert (hits.ids >= 0).all()
    assert (hits.ids % 2 == 0).all(), "a filter let through ids it does not allow"


def test_hnsw_tombstones_stay_dead_while_another_reader_rebuilds_their_bitmap() -> None:
    # The live-node bitmap of an index with tombstones was built lazily into two attributes;
    # a second search arriving meanwhile replaced it and freed the first search's bitmap:
    # removed images came back.
    n = 4000
    vectors = unit(n, seed=1)
    index = HNSWIndex(DIM)
    index.add(np.arange(n), vectors)
    removed = np.arange(0, n, 10)
    index.remove(removed)

    def another_reader() -> None:
        for lazy in ("_selector", "_live_selection"):  # as on the first search after a write
            if hasattr(index, lazy):
                setattr(index, lazy, None)
        index.search(vectors[:1], 5)

    index._index = ReusesFreedBitmaps(index._index, n // 8, another_reader)
    hits = index.search(vectors[removed[:20]], 5)
    assert not np.isin(hits.ids, removed).any(), "removed ids were returned"


@pytest.mark.parametrize("params", [{}, {"pca": 8}])
def test_a_zero_query_finds_as_many_vectors_as_any_other(params: dict[str, Any]) -> None:
    # Every score of a zero query ties; IVF-PQ's 4-bit fast scan then ranked nothing and the
    # search returned no result at all (every other kind returns k, each scoring 0).
    index = create_index("ivfpq", DIM, train_min=50, nlist=8, pq_m=4, **params)
    index.add(np.arange(300), unit(300))
    assert index.trained
    hits = index.search(np.vstack([np.zeros((1, DIM), np.float32), unit(1, seed=5)]), 10)
    assert (hits.ids >= 0).sum(axis=1).tolist() == [10, 10]
    assert len(set(hits.ids[0].tolist())) == 10 and np.allclose(hits.scores[0], 0.0)


# --- saved index files --------------------------------------------------------------------
def _saved(kind: str, directory: Path) -> Path:
    index = create_index(kind, DIM, **SMALL_TRAIN.get(kind, {}))
    index.add(np.arange(200), unit(200))
    path = directory / kind / "images.faiss"
    save_index(index, path)
    return path


@pytest.mark.parametrize("kind", ["hnsw", "hnsw_sq", "ivfpq"])
@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_a_torn_index_file_is_a_vector_index_error(tmp_path: Path, kind: str, keep: float) -> None:
    # Truncated .npz files raised EOFError / zipfile.BadZipFile, not VectorIndexError.
    path = _saved(kind, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if keep < 1 else int(keep)])
    with pytest.raises(VectorIndexError, match="cannot read index"):
        load_index(path)


@pytest.mark.parametrize(
    ("kind", "card_kind", "card_dim"),
    [("hnsw_sq", "ivfpq", DIM), ("ivfpq", "hnsw_sq", DIM), ("flat", "flat", 32),
     ("hnsw", "hnsw", 8), ("ivfpq", "ivfpq", 32)],
)  # fmt: skip
def test_a_card_that_does_not_describe_its_file_is_refused(
    tmp_path: Path, kind: str, card_kind: str, card_dim: int
) -> None:
    # The card named the loader, whatever the file held: an ivfpq file under an hnsw_sq card
    # loaded as ivfpq, and a card's dim was never compared with the index's.
    path = _saved(kind, tmp_path)
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card_file.write_text(json.dumps({**card, "kind": card_kind, "dim": card_dim}))
    with pytest.raises(VectorIndexError, match="but its card says"):
        load_index(path)


@pytest.mark.parametrize("card", ["[1, 2]", '"flat"', "\udcff"])
def test_a_card_that_is_not_an_object_is_a_vector_index_error(tmp_path: Path, card: str) -> None:
    path = _saved("flat", tmp_path)
    path.with_suffix(".json").write_bytes(card.encode("utf-8", "surrogateescape"))
    with pytest.raises(VectorIndexError):
        load_index(path)


@pytest.mark.parametrize("foreign", ["bare inner product", "ids over L2", "bare HNSW"])
def test_a_faiss_file_snapshop_did_not_write_is_not_a_flat_index(
    tmp_path: Path, foreign: str
) -> None:
    # Under a flat card, an L2 index with ids loaded and ranked by distance as if it were a
    # score (nearest last); one without ids loaded with a garbage dim or failed at search.
    made = {"bare inner product": lambda: faiss.IndexFlatIP(DIM),
            "ids over L2": lambda: faiss.IndexIDMap2(faiss.IndexFlatL2(DIM)),
            "bare HNSW": lambda: faiss.IndexHNSWFlat(DIM, 16)}[foreign]()  # fmt: skip
    vectors = unit(20)
    if isinstance(made, faiss.IndexIDMap2):
        made.add_with_ids(vectors, np.arange(20))
    else:
        made.add(vectors)
    faiss.write_index(made, str(tmp_path / "images.faiss"))
    (tmp_path / "images.json").write_text(json.dumps({"kind": "flat", "dim": DIM}))
    with pytest.raises(VectorIndexError, match="not an exact inner-product index"):
        load_index(tmp_path / "images.faiss")


# --- parameters and the memory budget -----------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "params"),
    [("hnsw", {"m": 10**9}), ("hnsw", {"ef_search": 10**9}), ("hnsw", {"m": 4.5}),
     ("hnsw_sq", {"m": 10**9}), ("hnsw_sq", {"ef_search": 10**9}),
     ("hnsw_sq", {"ef_construction": "40"})],
)  # fmt: skip
def test_graph_parameters_no_index_can_use_are_refused_when_it_is_made(
    kind: str, params: dict[str, Any]
) -> None:
    # Accepted, then std::bad_alloc (or the OOM killer) at the first add or search; a catalog
    # card naming them was written first (the check of a new index's size saw an empty one).
    with pytest.raises(VectorIndexError, match="must be a whole number from"):
        create_index(kind, DIM, **params)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "hnsw_sq", "ivfpq"])
def test_ids_and_k_that_are_not_whole_numbers_are_refused(kind: str) -> None:
    # id 1.7 was stored as id 1 and remove([1.5]) removed id 1; 2**64 was a raw OverflowError;
    # k = 1.5 a raw TypeError from numpy.
    index = create_index(kind, DIM, **SMALL_TRAIN.get(kind, {}))
    index.add(np.arange(1, 4), unit(3))
    for ids in (np.array([1.7]), [2**64], np.array([2**63], np.uint64), [True]):
        with pytest.raises(ValueError, match="ids must"):
            index.add(ids, unit(1, seed=2))
    with pytest.raises(ValueError, match="ids must"):
        index.remove(np.array([1.5]))
    assert sorted(index.ids().tolist()) == [1, 2, 3]
    assert index.remove(np.array([2.0])) == 1  # whole numbers in a float array are ids
    assert index.remove(np.array([])) == 0
    with pytest.raises(ValueError, match="k must be a whole number"):
        index.search(unit(1), 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "budget",
    [{"max_memory_bytes": math.nan}, {"max_memory_bytes": "2GB"}, {"max_query_ms": "5"},
     {"max_query_ms": None}, {"target_recall": "0.9"},
     {"max_memory_bytes": True}],
)  # fmt: skip
def test_a_budget_that_is_not_a_number_is_refused(budget: dict[str, Any]) -> None:
    # A NaN memory budget let every index fit (1M x 512 "fitted" in flat's 2 GB); text or None
    # were raw TypeErrors from the comparison.
    with pytest.raises(VectorIndexError):
        resolve_index_kind("auto", {"budget": budget}, 1_000_000, 512)
    with pytest.raises(VectorIndexError):
        IndexBudget.from_dict(budget)


def test_a_budget_that_is_not_a_mapping_and_a_zero_scan_rate_are_refused() -> None:
    with pytest.raises(VectorIndexError, match="mapping"):
        IndexBudget.from_dict([1])  # type: ignore[arg-type]
    with pytest.raises(VectorIndexError, match="exact_bytes_per_ms"):
        IndexBudget(exact_bytes_per_ms=0)


@pytest.mark.parametrize("budget", [500_000, 700_000])
def test_a_budget_chosen_for_several_indexes_holds_once_all_are_built(
    budget: int, tmp_path: Path
) -> None:
    # A catalog has an index for its images and one per crop position, each with its own IVF
    # centroids, but the choice counted those once: at 3,000 images with 3 crop positions, a
    # 300 kB budget chose ivfpq whose four indexes took 495 kB by their own accounting (400 kB
    # fits none of them).
    n, dim, indexes = 3000, 64, 4
    choice = choose_index(n, dim, IndexBudget(budget, 50.0), n_total=n * indexes, indexes=indexes)
    built = []
    for seed in range(indexes):
        index = create_index(choice.kind, dim, **choice.params)
        index.add(np.arange(n), unit(n, dim, seed))
        save_index(index, tmp_path / f"{seed}.faiss")  # as a catalog does: floats mapped
        built.append(index)
    total = sum(int(index.memory_bytes()) for index in built)
    assert total <= budget, f"{choice.kind} {choice.params}: {total:,} B for a {budget:,} B budget"
    assert choice.memory_bytes >= total * 0.9  # and the prediction says so
    with pytest.raises(VectorIndexError, match="fits"):
        choose_index(n, dim, IndexBudget(400_000, 50.0), n_total=n * indexes, indexes=indexes)


def test_a_catalog_counts_its_indexes_when_it_chooses_by_budget(tmp_path: Path) -> None:
    """The catalog passed no index count, so its choice still counted one index: an image
    index and two crop positions are three (on open and in `catalog reindex`)."""
    from unittest import mock

    import snapshop.catalog.catalog as catalog_module

    catalog = new_catalog(tmp_path / "c", dim=16, index_kind="auto")
    for i in range(4):
        crops = {"upper": unit(1, 16, 10 + i)[0], "lower": unit(1, 16, 20 + i)[0]}
        add_image(catalog, f"p{i}", unit(1, 16, i)[0], crops)
    catalog.close()
    seen: list[int] = []
    real_resolve, real_choose = catalog_module.resolve_index_kind, catalog_module.choose_index

    def resolve(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("indexes", 1))
        return real_resolve(*args, **kwargs)

    def choose(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("indexes", 1))
        return real_choose(*args, **kwargs)

    with (
        mock.patch.object(catalog_module, "resolve_index_kind", resolve),
        mock.patch.object(catalog_module, "choose_index", choose),
        open_catalog(tmp_path / "c") as reopened,
    ):
        reopened.reindex(IndexBudget())
    assert seen and set(seen) == {3}


def test_an_auto_cards_parameters_by_kind_are_judged_against_its_budget() -> None:
    # {"hnsw": {"m": 256}} on an auto card was merged in after the choice, made with m = 32:
    # 318 MB of index for a 150 MB budget.
    budget = {"max_memory_bytes": 150_000_000, "max_query_ms": 5.0}
    kind, params = resolve_index_kind("auto", {"budget": budget, "hnsw": {"m": 256}}, 100_000, 256)
    assert index_memory_bytes(kind, 100_000, 256, params) <= budget["max_memory_bytes"]
    roomy = {**budget, "max_memory_bytes": 400_000_000}
    assert resolve_index_kind("auto", {"budget": roomy, "hnsw": {"m": 256}}, 100_000, 256) == (
        "hnsw", {"m": 256, "ef_search": 128},
    )  # fmt: skip


# --- shop features ------------------------------------------------------------------------
def test_a_placeholder_photo_listed_under_two_products_is_a_duplicate(tmp_path: Path) -> None:
    # A flat grey image (a "no photo" tile) has nothing left once centred: its pixel
    # signature was all zeros, every pair scored 0 and the pixel check dropped it, even the
    # same file under two products. Shades and patterns stay apart.
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        vector = unit(1)[0]
        white = Image.new("RGB", (90, 60), (255, 255, 255))
        pattern = Image.effect_noise((90, 60), 60).convert("RGB")
        files = {"same-file-a": (white, "PNG"), "same-file-b": (white, "PNG"),
                 "re-encoded": (white, "JPEG"), "black": (Image.new("RGB", (90, 60)), "PNG"),
                 "pattern": (pattern, "PNG")}  # fmt: skip
        for sku, (image, fmt) in files.items():
            blob, sha = stored_file(directory, image, fmt)
            add_image(catalog, sku, vector, blob=blob, sha256=sha)
        report = find_duplicates(catalog, 0.9)
    finally:
        catalog.close()
    found = {frozenset((p.sku, p.other_sku)): p.pixel_score for p in report.pairs}
    white_ones = ("same-file-a", "same-file-b", "re-encoded")
    assert set(found) == {frozenset((a, b)) for a in white_ones for b in white_ones if a < b}
    assert found[frozenset(("same-file-a", "same-file-b"))] == 1.0


def test_a_product_deleted_during_an_export_is_not_exported(tmp_path: Path) -> None:
    # The export reads the product vectors once; a product removed meanwhile was still
    # exported, as rows with an empty sku.
    directory = tmp_path / "cat"
    new_catalog(directory).close()
    catalog = open_catalog(directory)
    fill_shop(catalog, 12, seed=3)
    calls: list[int] = []

    def remove_a_product_meanwhile(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:  # one batch of two products is on disk
            api.remove_products(directory, ["p08"])

    out = tmp_path / "similar.csv"
    try:
        report = export_similar(catalog, out, 3, batch_size=2, progress=remove_a_product_meanwhile)
    finally:
        catalog.close()
    rows = _csv_rows(out)
    assert all(row["sku"] for row in rows), "rows of a product that no longer exists"
    assert "p08" not in {row["sku"] for row in rows}
    assert report.products == 11 and report.rows == len(rows)


def test_an_export_with_a_large_k_holds_a_bounded_number_of_rows_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch's rows are Python lists until written: k = 1000 with batches of 8,192 products
    # peaked at 2.9 GB, and the CLI allows batches of 65,536. Batches now shrink with k
    # (MAX_BATCH_ROWS, made small here) and the output stays the same.
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    fill_shop(catalog, 40, seed=11)
    batches: list[int] = []
    monkeypatch.setattr(recommend, "MAX_BATCH_ROWS", 200, raising=False)
    try:
        export_similar(catalog, tmp_path / "wide.csv", 20, batch_size=65_536,
                       progress=batches.append)  # fmt: skip
        export_similar(catalog, tmp_path / "narrow.csv", 20, batch_size=3)
    finally:
        catalog.close()
    assert max(batches[1:]) * 20 <= 200, f"batches of {batches[1:]} products, k = 20"
    assert sum(batches[1:]) == 40
    wide, narrow = (_csv_rows(tmp_path / f"{name}.csv") for name in ("wide", "narrow"))
    key = ("product_id", "rank", "similar_product_id")
    assert [[r[c] for c in key] for r in wide] == [[r[c] for c in key] for r in narrow]
    assert np.allclose([float(r["score"]) for r in wide], [float(r["score"]) for r in narrow],
                       atol=1e-5)  # fmt: skip


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
