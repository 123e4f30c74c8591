"""A catalog shared by threads while it is written, index parameters checked before a card
names them, failed creations cleaned up, and a closed catalog refusing to be used."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import race

from snapshop import api
from snapshop.catalog.catalog import (
    CARD_FILE,
    Catalog,
    ReadWriteLock,
    create_catalog,
    open_catalog,
)
from snapshop.catalog.store import NewCrop
from snapshop.config import read_json
from snapshop.errors import CatalogError
from snapshop.search import ProductFilter, Searcher

DIM = 32
MODEL = "toy@000000000000"


class ToyEmbedder:
    """What a Searcher asks of an embedder before any photo is embedded."""

    model_id = MODEL
    dim = DIM


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def new_catalog(directory: Path, kind: str = "flat", **params: Any) -> Catalog:
    return create_catalog(directory, model_id=MODEL, model_ref="toy", dim=DIM,
                          index_kind=kind, index_params=params or None)  # fmt: skip


def add_products(
    catalog: Catalog,
    rng: np.random.Generator,
    skus: list[str],
    per: int = 3,
    near: np.ndarray | None = None,
) -> None:
    """One write: ``per`` images (each with an upper crop) for every sku; their vectors close
    to rows of ``near`` if given (so that searches for those find the new images first)."""
    with catalog.writing() as write:
        for n, sku in enumerate(skus):
            product = write.upsert_product(sku, title=sku, price=10.0, category="shirt")
            for _ in range(per):
                vec = unit(rng)[0]
                if near is not None:
                    vec = near[n % len(near)] + 0.1 * vec
                    vec /= np.linalg.norm(vec)
                crop = NewCrop("upper", "top", 0.9, (0, 0, 4, 4), unit(rng)[0])
                write.insert_image(product, source=f"{sku}.jpg", blob=None,
                                   sha256=f"{rng.integers(1 << 62):064x}", width=4, height=4,
                                   vector=vec, crops=[crop])  # fmt: skip


# --- 1. searches while another catalog object writes and the searcher refreshes -------------


@pytest.mark.parametrize("kind", ["hnsw", "flat"])
def test_searches_survive_refreshes_and_writes(tmp_path: Path, kind: str) -> None:
    """Four threads search through one Searcher while a second Catalog on the same directory
    adds and deletes products and a fifth thread refreshes: before the index lock, HNSW's
    graph grew before its labels (IndexError) and flat's id map was read while it moved."""
    rng = np.random.default_rng(0)
    catalog = new_catalog(tmp_path / "c", kind)
    add_products(catalog, rng, [f"s{i:03d}" for i in range(60)])
    searcher = Searcher(catalog, ToyEmbedder(), ranking="image")  # type: ignore[arg-type]
    writer_catalog = open_catalog(tmp_path / "c")
    queries = unit(rng, 16)
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(work: Any) -> Any:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # reported below, with the others
                errors.append(exc)
                stop.set()

        return run

    def writer() -> None:
        wrng = np.random.default_rng(1)
        n = 0
        while not stop.is_set():
            skus = [f"w{n}-{i}" for i in range(12)]
            add_products(writer_catalog, wrng, skus, per=4, near=queries)
            for sku in skus[:6]:
                found = writer_catalog.find_product(sku)
                assert found is not None
                writer_catalog.remove_product(found.id)
            n += 1

    def refresher() -> None:
        while not stop.is_set():
            searcher.refresh()

    def reader(seed: int) -> None:
        r = 0
        shirts = ProductFilter(category="shirt")
        while not stop.is_set():
            q = queries[(seed + r) % len(queries)]
            for ranking in ("image", "product"):
                hits = searcher.rank_products(q, 40, ranking=ranking)
                assert len({h.product_id for h in hits}) == len(hits)
            searcher.rank_products(q, 5, filters=shirts)
            r += 1

    work = [writer, refresher] + [lambda s=s: reader(s) for s in range(4)]
    threads = [threading.Thread(target=guarded(w)) for w in work]
    race(threads, stop, 5.0)
    writer_catalog.close()
    assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"
    searcher.refresh()
    index = catalog.index(None)
    assert index is not None
    assert np.array_equal(np.sort(index.ids()), np.sort(catalog.store.image_ids()))
    catalog.close()


def test_write_waits_for_a_search_and_searches_wait_for_the_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    catalog = new_catalog(tmp_path / "c")
    add_products(catalog, rng, ["a", "b"])
    events: list[str] = []
    searching, done = threading.Event(), threading.Event()

    def search() -> None:
        with catalog.reading():
            searching.set()
            done.wait(5)
            events.append("search-end")

    def write() -> None:
        searching.wait(5)
        add_products(catalog, rng, ["c"])
        events.append("write")

    threads = [threading.Thread(target=search), threading.Thread(target=write)]
    for t in threads:
        t.start()
    searching.wait(5)
    time.sleep(0.2)
    assert events == []  # the write committed, its index change waits for the search
    done.set()
    for t in threads:
        t.join(5)
    assert events == ["search-end", "write"]
    assert len(catalog.index(None) or []) == 9
    catalog.close()


def test_read_write_lock_reentrant_and_upgrade() -> None:
    lock = ReadWriteLock()
    with lock.write(), lock.read(), lock.write():  # the writer takes either side again
        pass
    waiting = threading.Event()
    order: list[str] = []

    def other_writer() -> None:
        waiting.set()
        with lock.write():
            order.append("other")

    with lock.read():
        t = threading.Thread(target=other_writer)
        t.start()
        waiting.wait(5)
        time.sleep(0.1)
        with lock.read():  # a reader reads again though a writer waits
            order.append("nested read")
        with lock.write():  # gives its read up meanwhile: no deadlock with the writer
            order.append("upgraded")
        order.append("read again")
    t.join(5)
    assert not t.is_alive()
    assert order[0] == "nested read" and set(order) == {"nested read", "upgraded", "read again",
                                                         "other"}  # fmt: skip


# --- 2. index parameters ------------------------------------------------------------------


def test_new_params_of_the_same_kind_rebuild_the_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with new_catalog(tmp_path / "c", "hnsw") as catalog:
        add_products(catalog, rng, ["a", "b"])
        catalog.save_indexes(measure=False)
    api.set_index_kind(tmp_path / "c", "hnsw", {"m": 48, "ef_search": 300})
    card = read_json(tmp_path / "c" / "index" / "images.json")
    assert (card["m"], card["ef_search"]) == (48, 300)
    with open_catalog(tmp_path / "c") as catalog:
        index: Any = catalog.index(None)
        assert (index.m, index.ef_search, len(index)) == (48, 300, 6)


def test_saved_index_of_other_params_rebuilt_on_open(tmp_path: Path) -> None:
    """A card changed by hand (or by an older version) with a saved index of the same kind."""
    rng = np.random.default_rng(0)
    with new_catalog(tmp_path / "c", "hnsw") as catalog:
        add_products(catalog, rng, ["a"])
        catalog.save_indexes(measure=False)
    path = tmp_path / "c" / CARD_FILE
    data = json.loads(path.read_text())
    data["index_params"] = {"m": 16}
    path.write_text(json.dumps(data))
    with open_catalog(tmp_path / "c") as catalog:
        index: Any = catalog.index(None)
        assert (index.m, len(index)) == (16, 3)


@pytest.mark.parametrize(
    ("kind", "params"),
    [("hnsw", {"bogus_param": 1}), ("hnsw", {"m": 2}), ("ivfpq", {"nlist": 10**9})],
)
def test_refused_params_leave_the_card_as_it_was(
    tmp_path: Path, kind: str, params: dict[str, Any]
) -> None:
    rng = np.random.default_rng(0)
    with new_catalog(tmp_path / "c", "hnsw") as catalog:
        add_products(catalog, rng, ["a"])
        catalog.save_indexes(measure=False)
    before = (tmp_path / "c" / CARD_FILE).read_text()
    with pytest.raises(CatalogError):
        api.set_index_kind(tmp_path / "c", kind, params)
    assert (tmp_path / "c" / CARD_FILE).read_text() == before
    for name in os.listdir(tmp_path / "c" / "index"):  # even once the caches are gone
        (tmp_path / "c" / "index" / name).unlink()
    with open_catalog(tmp_path / "c") as catalog:
        assert len(catalog.index(None) or []) == 3


def test_opening_a_card_with_refused_params_says_so(tmp_path: Path) -> None:
    with new_catalog(tmp_path / "c", "hnsw"):
        pass
    path = tmp_path / "c" / CARD_FILE
    data = json.loads(path.read_text())
    data["index_params"] = {"bogus_param": 1}
    path.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match="bogus_param"):
        open_catalog(tmp_path / "c")


# --- 3. a new catalog whose index cannot be made ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"),
    [("bogus", None), ("milvus", None), ("hnsw", {"bogus_param": 1}), ("ivfpq", {"nlist": 10**9})],
)
def test_failed_creation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, params: dict[str, Any] | None
) -> None:
    monkeypatch.delenv("SNAPSHOP_MILVUS_URI", raising=False)
    target = tmp_path / "new"
    with pytest.raises(CatalogError):
        create_catalog(target, model_id=MODEL, model_ref="toy", dim=DIM, index_kind=kind,
                       index_params=params)  # fmt: skip
    assert not (target / CARD_FILE).exists()
    assert not (target / "catalog.sqlite").exists()
    with new_catalog(target) as catalog:  # the directory takes a catalog after all
        assert catalog.index_kind == "flat"


def test_creation_failing_after_the_card_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Catalog, force: bool = False) -> bool:
        raise CatalogError("no index today")

    monkeypatch.setattr(Catalog, "refresh", refuse)
    target = tmp_path / "new"
    with pytest.raises(CatalogError, match="no index today"):
        new_catalog(target)
    assert sorted(p.name for p in target.iterdir()) == ["write.lock"]


def test_a_creation_killed_before_its_card_does_not_block_the_folder(tmp_path: Path) -> None:
    """``kill -9`` between writing the store and the card left a folder every later run
    refused as "not empty"; the empty store it left is now cleared under the lock."""
    import signal
    import subprocess

    target = tmp_path / "new"
    script = (
        "import os, signal, sys\n"
        "import snapshop.catalog.catalog as c\n"
        "c.write_card = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"c.create_catalog(sys.argv[1], model_id={MODEL!r}, model_ref='toy', dim={DIM})\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(target)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert (target / "catalog.sqlite").exists() and not (target / CARD_FILE).exists()
    with new_catalog(target) as catalog:
        add_products(catalog, np.random.default_rng(0), ["a"])
        assert catalog.counts()["products"] == 1


def test_a_store_with_products_but_no_card_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "c"
    with new_catalog(target) as catalog:
        add_products(catalog, np.random.default_rng(0), ["a", "b"])
    (target / CARD_FILE).unlink()  # a card lost by hand: the products are not creation debris
    with pytest.raises(CatalogError, match="holding products, but no catalog.json"):
        new_catalog(target)
    db = sqlite3.connect(target / "catalog.sqlite")
    assert db.execute("SELECT count(*) FROM products").fetchone()[0] == 2
    db.close()


# --- 4. a closed catalog ----------------------------------------------------------------------


def test_closed_catalog_refuses_use(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    catalog = new_catalog(tmp_path / "c")
    add_products(catalog, rng, ["a", "b"])
    searcher = Searcher(catalog, ToyEmbedder(), ranking="image")  # type: ignore[arg-type]
    searcher.auto_refresh = False
    query = unit(rng)[0]
    assert searcher.rank_products(query, 2)
    catalog.close()
    catalog.close()  # idempotent
    uses = [
        catalog.counts, catalog.info, lambda: catalog.find_product("a"),
        lambda: catalog.index(None), catalog.refresh, lambda: catalog.get_product(1),
        lambda: catalog.generation, lambda: searcher.rank_products(query, 2),
        lambda: searcher.rank_products(query, 2, ranking="product"), searcher.refresh,
    ]  # fmt: skip
    for use in uses:
        with pytest.raises(CatalogError, match="is closed"):
            use()
    assert catalog.closed
