"""A catalog directory survives concurrent writers, crashes and other users: an index kind
another process chose is kept, temp files of interrupted saves are collected, every file is
readable as a plain open() would have made it, and a damaged product-vector cache is
recomputed."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import add_vectors

from snapshop import api
from snapshop.catalog import blobs
from snapshop.catalog.catalog import create_catalog, open_catalog, reindex_catalog
from snapshop.config import is_temp_name, make_temp, read_json
from snapshop.index import create_index, save_index
from snapshop.index.choose import IndexBudget
from snapshop.product_vectors import CACHE_FILE, ProductVectors, mean_pool

DIM = 16
TWO_HOURS = 2 * 3600.0


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def saved_catalog(directory: Path, n: int = 500, products: int = 1, kind: str = "auto") -> None:
    """A closed catalog of ``n`` vectors over ``products`` products, its indexes saved."""
    rng = np.random.default_rng(5)
    catalog = create_catalog(directory, model_id="m", model_ref="m", dim=DIM, index_kind=kind)
    with catalog:
        for p, chunk in enumerate(np.array_split(unit(rng, n), products)):
            add_vectors(catalog, chunk, sku=f"sku-{p}")
        catalog.save_indexes()


@pytest.fixture()
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- 1. an index kind chosen by another process is kept -----------------------------------------
def reindex_by_budget(directory: Path) -> str:
    budget = IndexBudget(max_memory_bytes=20_000, max_query_ms=50)  # flat needs 36 kB
    return str(reindex_catalog(directory, budget)["kind"])


def set_kind_hnsw(directory: Path) -> str:
    api.set_index_kind(directory, "hnsw")  # what `snapshop index --index-kind hnsw` does first
    return "hnsw"


@pytest.mark.parametrize("change_kind", [reindex_by_budget, set_kind_hnsw])
def test_ingest_save_keeps_the_index_kind_another_process_chose(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change_kind: Callable[[Path], str]
) -> None:
    """`snapshop catalog reindex` (or `index --index-kind`) while an ingest runs: the
    ingest's next save adopts the new kind instead of writing its old one back."""
    directory = tmp_path / "c"
    saved_catalog(directory)
    with open_catalog(directory) as ingest:  # opened before the other process changes the kind
        assert ingest.index_kind == "flat"
        kind = change_kind(directory)
        assert kind != "flat" and read_json(directory / "index" / "images.json")["kind"] == kind
        added = add_vectors(ingest, unit(np.random.default_rng(6), 5), sku="late")
        ingest.save_indexes()
        assert ingest.index_kind == kind and ingest.index(None).kind == kind
        assert set(added) <= set(ingest.index(None).ids().tolist())

    assert read_json(directory / "index" / "images.json")["kind"] == kind
    caplog.clear()
    with caplog.at_level(logging.WARNING), open_catalog(directory) as reopened:
        assert reopened.index_kind == kind and reopened.index(None).kind == kind
        assert len(reopened.index(None)) == 505
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]


def test_ingest_that_grows_an_auto_catalog_saves_the_kind_the_next_open_resolves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Else every later open (a search, the service: readers never save) rebuilds them."""
    directory = tmp_path / "c"
    budget = {"budget": {"max_memory_bytes": 20_000, "max_query_ms": 50}}  # flat: 72 B/vector
    catalog = create_catalog(
        directory, model_id="m", model_ref="m", dim=DIM, index_kind="auto", index_params=budget
    )
    rng = np.random.default_rng(7)
    with catalog:
        add_vectors(catalog, unit(rng, 100))
        catalog.save_indexes()
        assert catalog.index_kind == "flat"
        add_vectors(catalog, unit(rng, 400), sku="more")
        catalog.save_indexes()
        grown = catalog.index_kind
        assert grown != "flat" and catalog.index(None).kind == grown
    assert read_json(directory / "index" / "images.json")["kind"] == grown
    caplog.clear()
    with caplog.at_level(logging.WARNING), open_catalog(directory) as reopened:
        assert reopened.index_kind == grown and len(reopened.index(None)) == 500
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]


def test_save_with_an_unchanged_card_keeps_its_indexes(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    saved_catalog(directory)
    with open_catalog(directory) as catalog:
        index = catalog.index(None)
        catalog.save_indexes()
        assert catalog.index(None) is index


# --- 2. temp files of interrupted saves are collected -------------------------------------------
def leftovers(directory: Path) -> list[Path]:
    """Temp files as a crash in each kind of save leaves them: index backends (named as
    today, and as tempfile.mkstemp named them before), product vectors, cards, thumbnails."""
    index_dir = directory / "index"
    made: list[Path] = []
    for folder, kind in [(index_dir, ".faiss"), (index_dir, ".hnsw"), (index_dir, ".npy"),
                         (index_dir, ".reranked"), (index_dir, ".npz"), (index_dir, ".json"),
                         (directory, ".json")]:  # fmt: skip
        fd, path = make_temp(folder, kind)
        os.close(fd)
        made.append(path)
    for suffix in (".faiss.tmp", ".npz.tmp"):
        fd, name = tempfile.mkstemp(dir=index_dir, suffix=suffix)
        os.close(fd)
        made.append(Path(name))
    thumb_shard = blobs.THUMBNAILS.file(directory, 256, "ab" * 32).parent
    thumb_shard.mkdir(parents=True)
    fd, path = make_temp(thumb_shard)
    os.close(fd)
    made.append(path)
    for path in made:
        path.write_bytes(b"\0" * 1000)
    return made


def test_gc_collects_temp_files_of_interrupted_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "c"
    saved_catalog(directory)
    made = leftovers(directory)
    assert all(is_temp_name(p.name) for p in made)
    keep = {p for p in directory.rglob("*") if p.is_file() and p not in made}

    with open_catalog(directory) as catalog:
        young = catalog.collect_garbage()  # all within the grace period: maybe saves in flight
        assert young.temp_files_found == 0 and young.young_files_kept == len(made)
        real = time.time
        monkeypatch.setattr(blobs, "_now", lambda: real() + TWO_HOURS)
        dry = catalog.collect_garbage(dry_run=True)
        assert (dry.temp_files_found, dry.temp_files_removed) == (len(made), 0)
        assert dry.reclaimable_bytes == 1000 * len(made) and dry.bytes_freed == 0
        assert all(p.exists() for p in made)
        report = catalog.collect_garbage()
    assert (report.temp_files_found, report.temp_files_removed) == (len(made), len(made))
    assert report.bytes_freed == 1000 * len(made)
    assert not any(p.exists() for p in made)
    assert {p for p in directory.rglob("*") if p.is_file()} == keep
    with open_catalog(directory) as reopened:
        assert len(reopened.index(None)) == 500


def test_index_saves_name_their_temp_files_for_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that dies before its rename leaves a file gc recognises (the finally that
    removes it is not reached when the process is killed)."""
    seen: list[str] = []
    real_replace = Path.replace

    def crash(self: Path, target: Any) -> Path:
        seen.append(self.name)
        raise OSError("killed")

    rng = np.random.default_rng(1)
    monkeypatch.setattr(Path, "replace", crash)
    for kind in ("flat", "hnsw", "hnsw_sq"):
        index = create_index(kind, DIM)
        index.add(np.arange(50, dtype=np.int64), unit(rng, 50))
        with pytest.raises(OSError, match="killed"):
            index.save(tmp_path / f"{kind}.faiss")
    monkeypatch.setattr(Path, "replace", real_replace)
    assert len(seen) == 3 and all(is_temp_name(name) for name in seen), seen


# --- 3. files are as readable as open() makes them ------------------------------------------------
def modes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_catalog_files_get_the_mode_open_gives(tmp_path: Path, umask_022: None) -> None:
    """An indexer and a read-only service running as another user: every file the indexer
    writes is readable by others (0o666 less the umask), not mkstemp's 0o600."""
    directory = tmp_path / "c"
    saved_catalog(directory, products=3)
    rng = np.random.default_rng(2)
    for kind in ("hnsw", "hnsw_sq"):
        index = create_index(kind, DIM)
        index.add(np.arange(50, dtype=np.int64), unit(rng, 50))
        save_index(index, directory / "index" / f"extra-{kind}.faiss")
    with open_catalog(directory) as catalog:
        ProductVectors(catalog)  # writes index/products.npz
        blob = blobs.write_blob(catalog.blob_dir, "ab" * 32, b"\xff\xd8\xff\xe0 some jpeg")
    found = modes(directory)
    expected = [
        blob, "catalog.json", "index/images.faiss", f"index/{CACHE_FILE}",
        "index/extra-hnsw.faiss", "index/extra-hnsw_sq.faiss", "index/extra-hnsw_sq.vectors.npy",
    ]  # fmt: skip
    assert set(expected) <= set(found), sorted(found)
    assert {name: mode for name, mode in found.items() if mode != 0o644} == {}


def test_temp_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o007)
    try:
        fd, path = make_temp(tmp_path, ".faiss")
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert is_temp_name(path.name) and path.name.endswith(".faiss.tmp")
    with pytest.raises(ValueError):
        make_temp(tmp_path, "/../x")


# --- 4. a damaged product-vector cache is recomputed ----------------------------------------------
def damage_nan(arrays: dict[str, np.ndarray]) -> None:
    arrays["images.vectors"][0, 0] = np.nan


def damage_inf(arrays: dict[str, np.ndarray]) -> None:
    arrays["images.vectors"][-1, 3] = -np.inf


def damage_unsorted_products(arrays: dict[str, np.ndarray]) -> None:
    arrays["images.product_ids"] = arrays["images.product_ids"][::-1].copy()


def damage_owner_count(arrays: dict[str, np.ndarray]) -> None:
    arrays["images.entry_owner"] = arrays["images.entry_owner"][:-1]


def damage_dtype(arrays: dict[str, np.ndarray]) -> None:
    arrays["images.vectors"] = arrays["images.vectors"].astype(np.float64)


@pytest.mark.parametrize(
    "damage",
    [damage_nan, damage_inf, damage_unsorted_products, damage_owner_count, damage_dtype],
)
def test_damaged_product_vector_cache_is_recomputed(
    tmp_path: Path, damage: Callable[[dict[str, np.ndarray]], None]
) -> None:
    directory = tmp_path / "c"
    saved_catalog(directory, n=40, products=4)
    with open_catalog(directory) as catalog:
        ProductVectors(catalog)
    path = directory / "index" / CACHE_FILE
    with np.load(path) as data:
        arrays = {key: data[key].copy() for key in data.files}
    damage(arrays)
    np.savez(path, **arrays)  # type: ignore[arg-type]

    with open_catalog(directory) as catalog:
        vectors = ProductVectors(catalog)
        ids, vecs = vectors.vectors()
        assert np.isfinite(vecs).all() and vecs.dtype == np.float32
        batches = list(catalog.store.iter_vectors("images", DIM))
        image_ids = np.concatenate([i for i, _ in batches]).tolist()
        owners = catalog.store.image_product_map(image_ids)
        want_ids, want_vecs = mean_pool(
            np.array([owners[i] for i in image_ids], np.int64),
            np.concatenate([v for _, v in batches]),
        )
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(vecs, want_vecs, atol=1e-6)
        hits = vectors.index().search(vecs[:2], 2)  # the search that raised before
        assert hits.ids[:, 0].tolist() == ids[:2].tolist()
    with np.load(path) as data:  # and the recomputed cache was saved
        assert np.isfinite(data["images.vectors"]).all()
