"""The store's change log: replicas refresh by the ids each write added and removed, not by
reading every id, and end up holding exactly what a full comparison with the store gives.

References are brute force: a separate store connection reads every id of ``images`` and of
``crops`` per position."""

from __future__ import annotations

import sqlite3
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from snapshop.catalog.card import read_card
from snapshop.catalog.catalog import IMAGES, Catalog, create_catalog, index_name, open_catalog
from snapshop.catalog.store import CatalogStore, NewCrop, open_store
from snapshop.product_vectors import ProductVectors

DIM = 8
MODEL_ID = "toy@000000000000"
Entries = dict[str | None, set[int]]


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def store_entries(store: CatalogStore) -> Entries:
    """Every image id (key None) and crop id per position: the full scan, as reference."""
    found: Entries = {None: set(store.image_ids().tolist())}
    for position in store.crop_positions():
        found[position] = set(store.crop_ids(position).tolist())
    return found


def add_image(
    catalog: Catalog, sku: str, rng: np.random.Generator, positions: tuple[str, ...] = ()
) -> int:
    """One image (with a crop at each of ``positions``) written the way ingest writes."""
    crops = [NewCrop(p, "label", 0.9, (0.0, 0.0, 4.0, 4.0), unit(rng)) for p in positions]
    with catalog.writing() as write:
        product = write.upsert_product(sku)
        image_id, _ = write.insert_image(
            product, source=f"{sku}.jpg", blob=None, sha256=f"{rng.integers(1 << 62):064x}",
            width=4, height=4, vector=unit(rng), crops=crops,
        )  # fmt: skip
    return image_id


def add_rows(store: CatalogStore, sku: str, rng: np.random.Generator, position: str) -> None:
    """An image and a crop written straight into the store, as another process would."""
    with store.transaction() as db:
        product = store.upsert_product(db, sku)
        store.insert_image(
            db, product, source=f"{sku}.jpg", blob=None, sha256=f"{rng.integers(1 << 62):064x}",
            width=4, height=4, vector=unit(rng),
            crops=[NewCrop(position, "label", 0.9, (0.0, 0.0, 4.0, 4.0), unit(rng))],
        )  # fmt: skip


def product_id(catalog: Catalog, sku: str) -> int:
    found = catalog.store.find_product(sku)
    assert found is not None
    return found.id


def assert_reader_matches(reader: Catalog, reference: CatalogStore) -> None:
    """The reader's indexes hold exactly the store's entries; positions the store no longer
    holds have empty indexes (or none)."""
    want = store_entries(reference)
    for position, ids in want.items():
        index = reader.index(position)
        assert index is not None, position
        assert set(index.ids().tolist()) == ids, position
        assert len(index) == len(ids)
    for name, index in reader.indexes.items():
        position = None if name == IMAGES else name.removeprefix("crops-")
        if position not in want:
            assert len(index) == 0, name


def assert_vectors_match(pv: ProductVectors, reference: CatalogStore) -> None:
    """The product vectors' entries are the store's (every product's, per position)."""
    want = store_entries(reference)
    every_product = [p.id for p in reference.list_products(limit=10_000)]
    for position, ids in want.items():
        entries, _ = pv.entries(every_product, position)
        assert set(entries.tolist()) == ids, position


class Replicas:
    """A writer and a reader catalog on one store, a reference store connection, and the
    reader's product vectors."""

    def __init__(self, writer: Catalog, reader: Catalog, reference: CatalogStore) -> None:
        self.writer, self.reader, self.reference = writer, reader, reference
        self.pv = ProductVectors(reader, save=False)

    def check(self) -> None:
        assert self.reader.refresh() is True
        assert self.reader.refreshed_generation == self.reference.generation
        assert self.pv.refresh(save=False) is True
        assert_reader_matches(self.reader, self.reference)
        assert_vectors_match(self.pv, self.reference)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
        self.reference.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replicas]:
    """A directory catalog (faiss indexes, copies in each process) or a server catalog
    (pgvector: the rows are the index; the product vectors are each replica's own)."""
    if request.param == "sqlite":
        target: str | Path = tmp_path / "catalog"
        writer = create_catalog(target, model_id=MODEL_ID, model_ref="toy", dim=DIM)
        reference = open_store(Path(target) / "catalog.sqlite")
    else:
        target = str(request.getfixturevalue("pg_database"))
        writer = create_catalog(target, model_id=MODEL_ID, model_ref="toy", dim=DIM)
        reference = open_store(target)
    add_image(writer, "seed", np.random.default_rng(0), ("upper",))
    pair = Replicas(writer, open_catalog(target), reference)
    yield pair
    pair.close()


def write_and_check(pair: Replicas) -> None:
    """Adds, deletes (cascading from products and images), a new position, a position
    emptied, a metadata write and a gc, each followed by the reader's refresh."""
    writer, rng = pair.writer, np.random.default_rng(1)
    for n in range(4):
        add_image(writer, f"p{n}", rng, ("upper",))
    pair.check()
    add_image(writer, "p1", rng, ("upper", "lower"))  # a position the reader never saw
    pair.check()
    writer.remove_product(product_id(writer, "p0"))  # its image and crop go by cascade
    writer.remove_images([im.id for im in writer.images_of(product_id(writer, "p2"))])
    pair.check()
    add_image(writer, "p5", rng)
    writer.remove_product(product_id(writer, "p5"))  # added and removed between refreshes
    add_rows(writer.store, "p6", rng, "lower")  # not through the writer's indexes
    pair.check()
    for sku in ("p1", "p6"):  # every crop at "lower" goes: its index ends up empty
        writer.remove_product(product_id(writer, sku))
    writer.update_product(product_id(writer, "p3"), title="renamed")  # no entry changes
    if not writer.is_server:
        writer.collect_garbage(min_age_seconds=0)
    pair.check()
    assert len(pair.reader.index("lower")) == 0  # type: ignore[arg-type]
    assert pair.reader.refresh() is False


def test_a_reader_follows_every_write_by_the_log(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and never lists every image id, in the store or in its own index."""
    scans: list[str] = []
    image_ids, current_entries = replicas.reader.store.image_ids, replicas.pv._current_entries

    def counted(*args: Any) -> Any:
        scans.append("images")
        return image_ids(*args)

    def counted_entries(name: str) -> Any:
        scans.append(f"entries of {name}")
        return current_entries(name)

    monkeypatch.setattr(replicas.reader.store, "image_ids", counted)
    monkeypatch.setattr(replicas.pv, "_current_entries", counted_entries)
    write_and_check(replicas)
    assert scans == []


def test_the_log_path_reads_no_full_id_list(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the log, the reader never asks the store for every id (nor for every position),
    and its product vectors never list the index's ids."""

    def full_scan(*args: Any) -> Any:
        raise AssertionError("full id scan")

    for method in ("image_ids", "crop_ids", "crop_positions"):
        monkeypatch.setattr(replicas.reader.store, method, full_scan)
    monkeypatch.setattr(replicas.pv, "_current_entries", full_scan)
    rng = np.random.default_rng(2)
    add_image(replicas.writer, "q0", rng, ("upper",))
    add_image(replicas.writer, "q1", rng)
    replicas.writer.remove_product(product_id(replicas.writer, "seed"))
    replicas.check()


def test_refreshes_racing_writes_by_both_catalogs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader refreshes in one thread while the other catalog writes in a second and the
    reader itself writes in a third (its own writes reach its indexes before its refresh has
    caught up with the other's): afterwards its indexes hold exactly the store's entries,
    each once, and no refresh compared all ids."""
    directory = tmp_path / "catalog"
    other = create_catalog(directory, model_id=MODEL_ID, model_ref="toy", dim=DIM)
    add_image(other, "seed", np.random.default_rng(9), ("upper",))
    reader, reference = open_catalog(directory), open_store(directory / "catalog.sqlite")
    monkeypatch.setattr(reader.store, "image_ids", lambda: pytest.fail("full id scan"))
    errors: list[BaseException] = []

    def writes(catalog: Catalog, prefix: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for n in range(12):
                add_image(catalog, f"{prefix}{n}", rng, ("upper", "lower")[: n % 3])
                if n % 4 == 3:
                    catalog.remove_product(product_id(catalog, f"{prefix}{n - 2}"))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    def refreshes() -> None:
        try:
            for _ in range(40):
                reader.refresh()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=writes, args=(other, "o", 1)),
               threading.Thread(target=writes, args=(reader, "r", 2)),
               threading.Thread(target=refreshes)]  # fmt: skip
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        reader.refresh()
        assert_reader_matches(reader, reference)
    finally:
        reader.close()
        other.close()
        reference.close()


def test_a_reader_behind_the_pruned_log_compares_all_ids(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer prunes the log past the reader's generation: the reader's next refresh
    falls back to the full comparison, and the one after uses the log again."""
    scans: list[str] = []
    image_ids = replicas.reader.store.image_ids

    def counted() -> np.ndarray:
        scans.append("images")
        return image_ids()

    monkeypatch.setattr(replicas.reader.store, "image_ids", counted)
    replicas.writer.store.change_log_rows = 3
    rng = np.random.default_rng(3)
    for n in range(3):
        add_image(replicas.writer, f"r{n}", rng, ("upper",))  # 2 rows each
    assert replicas.reader.store.entry_changes(replicas.reader.refreshed_generation,
                                               replicas.reference.generation) is None  # fmt: skip
    replicas.check()
    assert scans == [] if replicas.writer.is_server else scans == ["images"]
    add_image(replicas.writer, "r3", rng)
    replicas.check()
    assert len(scans) <= 1


# --- the log in the store, both engines --------------------------------------------------------
def test_the_log_holds_each_generations_changes(store_target: str) -> None:
    """For every pair of generations a < b, the entries at a with the changes of (a, b]
    applied are the entries at b: adds, cascading deletes, deletes of images."""
    store = open_store(store_target, dim=DIM)
    rng = np.random.default_rng(4)
    seen = {store.generation: store_entries(store)}
    try:
        for step in range(12):
            with store.transaction() as db:
                for k in range(int(rng.integers(1, 3))):
                    product = store.upsert_product(db, f"s{rng.integers(5)}")
                    store.insert_image(
                        db, product, source="x", blob=None, width=4, height=4,
                        sha256=f"{step:032x}{k:032x}", vector=unit(rng),
                        crops=[NewCrop(str(p), "l", 0.5, (0, 0, 1, 1), unit(rng))
                               for p in rng.choice(["upper", "lower"], int(rng.integers(3)))],
                    )  # fmt: skip
            if step % 3 == 2:
                products = [p.id for p in store.list_products()]
                store.delete_product(int(rng.choice(products)))
            if step % 4 == 3:
                store.delete_images(store.image_ids()[:1].tolist())
            seen[store.generation] = store_entries(store)
        for since, before in seen.items():
            for until, after in seen.items():
                if since >= until:
                    continue
                changes = store.entry_changes(since, until)
                assert changes is not None
                for position in set(before) | set(after) | changes.positions():
                    ids = before.get(position, set()) | set(changes.added_at(position).tolist())
                    ids -= set(changes.removed_at(position).tolist())
                    assert ids == after.get(position, set()), (since, until, position)
    finally:
        store.close()


def test_pruning_keeps_whole_recent_generations(store_target: str) -> None:
    store = open_store(store_target, dim=DIM)
    store.change_log_rows = 4
    rng = np.random.default_rng(5)
    try:
        for n in range(6):  # an image and a crop a write: 2 rows
            with store.transaction() as db:
                product = store.upsert_product(db, f"t{n}")
                store.insert_image(
                    db, product, source="x", blob=None, width=4, height=4,
                    sha256=f"{n:064x}", vector=unit(rng),
                    crops=[NewCrop("upper", "l", 0.5, (0, 0, 1, 1), unit(rng))],
                )  # fmt: skip
        generation = store.generation
        assert store.entry_changes(generation - 3, generation) is None  # pruned
        changes = store.entry_changes(generation - 2, generation)
        assert changes is not None and len(changes.added_at(None)) == 2
        with store.transaction(bump=False) as db:
            rows = db.execute("SELECT COUNT(*) FROM change_log").fetchone()[0]
        assert rows == 4
        assert store.entry_changes(generation, generation) is not None  # nothing to apply
    finally:
        store.close()


def drop_change_log(target: str) -> None:
    """Make ``target`` a catalog as it was before the change log (schema version 2)."""
    store = open_store(target)
    try:
        with store.transaction(bump=False) as db:
            for table in ("images", "crops"):
                for event in ("insert", "delete"):
                    name = f"change_log_{table}_{event}"
                    if db.engine == "sqlite":
                        db.execute(f"DROP TRIGGER {name}")
                    else:
                        db.execute(f"DROP TRIGGER {name} ON {table}")
                        db.execute(f"DROP FUNCTION {name}()")
            db.execute("DROP TABLE change_log")
            db.execute("DELETE FROM schema_migrations WHERE version = 3")
            db.execute("DELETE FROM meta WHERE key = 'change_log_after'")
            db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    finally:
        store.close()


def test_an_old_catalog_gets_the_log_on_open(store_target: str) -> None:
    """A catalog made before the log: a read-only store opens it and has no changes to give
    (its reader compares all ids); the first writable open adds the log, complete from
    the generation it was added at, and the read-only store then finds it."""
    rng = np.random.default_rng(6)
    store = open_store(store_target, dim=DIM)
    add_rows(store, "old", rng, "upper")
    store.close()
    drop_change_log(store_target)
    reader = CatalogStore(store_target, readonly=True)
    try:
        added_at = reader.generation
        assert reader.entry_changes(0, added_at) is None
        assert reader.entry_changes(added_at, added_at) is None
        writer = open_store(store_target)  # migrates
        try:
            add_rows(writer, "new", rng, "lower")
            assert reader.entry_changes(added_at - 1, writer.generation) is None
            changes = reader.entry_changes(added_at, writer.generation)
            assert changes is not None
            assert set(changes.added) == {None, "lower"} and not changes.removed
            assert changes.added_at("lower").tolist() == writer.crop_ids("lower").tolist()
        finally:
            writer.close()
    finally:
        reader.close()


def test_a_reader_on_an_old_catalog_compares_ids_until_the_log_is_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader opened read-only on a catalog without the log follows a writer that writes
    as code before the log did; once a writer adds the log, it follows by the log."""
    directory = tmp_path / "catalog"
    writer = create_catalog(directory, model_id=MODEL_ID, model_ref="toy", dim=DIM)
    rng = np.random.default_rng(7)
    add_image(writer, "a", rng, ("upper",))
    writer.close()
    drop_change_log(str(directory / "catalog.sqlite"))
    reference = open_store(directory / "catalog.sqlite", readonly=True)
    card = read_card(directory / "catalog.json")
    reader = Catalog(directory, card, CatalogStore(directory / "catalog.sqlite", readonly=True))
    try:
        old = sqlite3.connect(directory / "catalog.sqlite")  # a writer of before the log
        old.execute("PRAGMA foreign_keys=ON")
        with old:
            old.execute("DELETE FROM products WHERE sku = 'a'")
            old.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        old.close()
        assert reader.refresh() is True
        assert_reader_matches(reader, reference)
        writer = open_catalog(directory)  # adds the log
        add_image(writer, "b", rng, ("lower",))
        add_image(writer, "c", rng, ("upper",))
        writer.remove_product(product_id(writer, "b"))
        monkeypatch.setattr(reader.store, "image_ids", lambda: pytest.fail("full id scan"))
        assert reader.refresh() is True
        assert_reader_matches(reader, reference)
        writer.close()
    finally:
        reader.close()
        reference.close()


# --- /v1/stats ----------------------------------------------------------------------------------
def test_stats_lists_a_position_another_replica_wrote_first(tmp_path: Path) -> None:
    from snapshop.search import Searcher
    from snapshop.service import ServiceSettings, create_app

    directory = tmp_path / "catalog"
    writer = create_catalog(directory, model_id=MODEL_ID, model_ref="toy", dim=DIM)
    rng = np.random.default_rng(8)
    add_image(writer, "a", rng, ("upper",))
    served = open_catalog(directory)
    embedder = types.SimpleNamespace(model_id=MODEL_ID,
                                     card=types.SimpleNamespace(to_dict=lambda: {}))  # fmt: skip
    searcher = Searcher(served, embedder)  # type: ignore[arg-type]
    try:
        with TestClient(create_app(ServiceSettings(directory), searcher=searcher)) as client:
            before = client.get("/v1/stats").json()
            assert index_name("lower") not in before["indexes"]
            add_image(writer, "b", rng, ("lower",))  # another replica, first at "lower"
            stats = client.get("/v1/stats").json()
        assert stats["indexes"][index_name("lower")] == 1
        assert stats["indexes"][IMAGES] == stats["images"] == 2
        assert stats["generation"] == writer.generation
    finally:
        served.close()
        writer.close()
