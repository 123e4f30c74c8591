"""The catalog store: products, images, garment crops and the durable copy of their vectors.

One implementation over two SQL engines (:mod:`snapshop.catalog.sql`): a SQLite file (WAL; the
embedded default) or a PostgreSQL database with pgvector (a server catalog, ``postgresql://``
DSN), the source of truth either way. Every image row is committed in the same transaction
as its embedding, so a crash can never leave a row without a vector or the reverse; the
vector indexes are caches rebuilt or reconciled from here (see ``catalog.catalog``).

Ids are never handed out again after a delete (SQLite ``AUTOINCREMENT``, PostgreSQL identity
sequences), so an index reconciled by id difference can never keep a deleted image's vector
under a new image's id. The schema is versioned (:mod:`snapshop.catalog.migrations`).

A change log (``change_log``, filled by triggers: :func:`snapshop.catalog.sql.change_log_triggers`)
records which image and crop ids each write added or removed, so a replica catches up by
reading the changes since its generation (:meth:`CatalogStore.entry_changes`) rather than
every id. Each write prunes it to about :data:`CHANGE_LOG_ROWS` rows, whole generations at a
time; ``meta.change_log_after`` says from which generation on it is complete.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog import migrations
from snapshop.catalog.fields import (
    attributes_json,
    check_product_fields,
    crop_position_problem,
    is_sha256,
    lookup_sku,
    normalise_sku,
    sku_forms,
    stored_attributes,
)
from snapshop.catalog.fields import check_product_url as check_product_url  # re-exported
from snapshop.catalog.fields import has_control_characters as has_control_characters
from snapshop.catalog.sql import (
    Database,
    PostgresDatabase,
    connect,
    is_server_target,
    pgvector_missing,
    sqlite_storage_failure,
    writers_busy,
)
from snapshop.errors import (
    CatalogBusyError,
    CatalogError,
    CatalogStorageError,
    CatalogUnavailableError,
    FieldError,
    NotFoundError,
)

log = logging.getLogger(__name__)
SCHEMA_VERSION = migrations.LATEST

PRODUCT_FIELDS = ("title", "url", "price", "currency", "category")
MAX_ROW_ID = 2**63 - 1  # SQLite integers are signed 64-bit
# Change-log rows kept (whole generations): about 3 MB. A replica further behind than this
# compares ids in full, which costs about what reading that many changes would.
CHANGE_LOG_ROWS = 100_000
CHANGE_LOG_AFTER = "change_log_after"  # meta key: the log is complete after this generation


def _row_id(value: int, what: str) -> int:
    """``value`` as an id SQLite can look up; one beyond its integers names nothing."""
    value = int(value)
    if abs(value) > MAX_ROW_ID:
        raise NotFoundError(f"no {what} with id {value}")
    return value


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Product:
    id: int
    sku: str
    title: str | None = None
    url: str | None = None
    price: float | None = None
    currency: str | None = None
    category: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class ImageRow:
    id: int
    product_id: int
    source: str
    blob: str | None
    sha256: str
    width: int
    height: int
    created_at: str


@dataclass(frozen=True)
class CropRow:
    id: int
    image_id: int
    position: str
    label: str
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class NewCrop:
    position: str
    label: str
    score: float
    box: tuple[float, float, float, float]
    vector: NDArray[np.float32]


@dataclass(frozen=True)
class EntryChanges:
    """What the writes of generations (``since``, ``until``] did to the index entries, by
    position (None: images; else a crop's garment position), ids ascending.

    An entry's last change in the window decides: ``added`` holds those last inserted (so
    there at ``until``), ``removed`` those last deleted (some perhaps inserted in between).
    The entries at ``until`` are then ``(entries ∪ added) − removed`` from any state between
    ``since`` and ``until`` (an index that already holds some of these changes included):
    applying them twice changes nothing.
    """

    since: int
    until: int
    added: dict[str | None, NDArray[np.int64]]
    removed: dict[str | None, NDArray[np.int64]]

    def positions(self) -> set[str | None]:
        """Positions with any change (None: images)."""
        return set(self.added) | set(self.removed)

    def added_at(self, position: str | None) -> NDArray[np.int64]:
        return self.added.get(position, np.zeros(0, np.int64))

    def removed_at(self, position: str | None) -> NDArray[np.int64]:
        return self.removed.get(position, np.zeros(0, np.int64))


def _entry_changes(since: int, until: int, rows: list[Any]) -> EntryChanges:
    """:class:`EntryChanges` of change-log rows (entry, position, added) in log order."""
    last: dict[tuple[str | None, int], bool] = {}
    for entry, position, added in rows:
        last[position, int(entry)] = bool(added)
    came: dict[str | None, list[int]] = {}
    went: dict[str | None, list[int]] = {}
    for (position, entry), added in last.items():
        (came if added else went).setdefault(position, []).append(entry)
    return EntryChanges(
        since, until,
        {p: np.array(sorted(ids), np.int64) for p, ids in came.items()},
        {p: np.array(sorted(ids), np.int64) for p, ids in went.items()},
    )  # fmt: skip


def _product(row: Any) -> Product:
    return Product(
        id=row["id"], sku=row["sku"], title=row["title"], url=row["url"], price=row["price"],
        currency=row["currency"], category=row["category"],
        attributes=stored_attributes(row["attributes"], row["id"]),
        created_at=row["created_at"], updated_at=row["updated_at"],
    )  # fmt: skip


def _image(row: Any) -> ImageRow:
    return ImageRow(
        id=row["id"], product_id=row["product_id"], source=row["source"], blob=row["blob"],
        sha256=row["sha256"], width=row["width"], height=row["height"],
        created_at=row["created_at"],
    )  # fmt: skip


def _product_conditions(
    category: str | None, min_price: float | None, max_price: float | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (over ``products p``) and parameters of a product filter."""
    conditions, params = [], []
    for condition, value in (("p.category = ?", category), ("p.price >= ?", min_price),
                             ("p.price <= ?", max_price)):  # fmt: skip
        if value is not None:
            conditions.append(condition)
            params.append(value)
    return ("WHERE " + " AND ".join(conditions) if conditions else ""), params


def open_store(
    target: str | os.PathLike[str], *, dim: int | None = None, readonly: bool = False
) -> CatalogStore:
    """The catalog store at ``target``: a SQLite file path, or a ``postgresql://`` /
    ``postgres://`` DSN. A new PostgreSQL catalog needs ``dim`` (its vector columns are
    ``vector(dim)``); an existing one reads it from its meta table."""
    return CatalogStore(target, readonly, dim=dim)


IN_LIST = 500  # values per IN (...) list: within both engines' limits on parameters


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _as_stored(rows: Sequence[Any], key: str) -> Any:
    """Of the rows a sku's forms found, the one stored as ``key`` (its lookup form), else a
    legacy one, else None."""
    exact = [row for row in rows if row["sku"] == key]
    return exact[0] if exact else (rows[0] if rows else None)


def _in_lists(values: Sequence[Any]) -> Iterator[tuple[list[Any], str]]:
    """``values`` in lists of at most :data:`IN_LIST`, each with its ``?,?,...`` marks."""
    for start in range(0, len(values), IN_LIST):
        chunk = list(values[start : start + IN_LIST])
        yield chunk, ",".join("?" * len(chunk))


class CatalogStore:
    """Thread-safe access to one catalog database (SQLite file or PostgreSQL).

    Every write bumps ``generation`` in the same transaction, which lets index caches tell
    whether they are current. One connection behind a lock, as the service's thread pool
    needs; a write transaction holds the lock to its end. A PostgreSQL store writes on a
    second connection with a lock of its own, so its reads never queue behind a write that
    waits for another process's (or host's) writer; the writing thread's own reads go to the
    write connection and see its transaction.
    """

    change_log_rows = CHANGE_LOG_ROWS  # what this store's writes prune the change log to

    def __init__(
        self,
        target: str | os.PathLike[str],
        readonly: bool = False,
        *,
        dim: int | None = None,
        alone: bool = False,
    ) -> None:
        """``alone``: a SQLite file opened so that other connections wait until this one
        closes, which opens on a full disk (see :class:`SqliteDatabase`)."""
        # Whether the database has a change log: a read-only store of a catalog made before
        # it looks again on each use, since a writer may add it meanwhile.
        self._has_change_log = False
        self._lock = threading.RLock()  # the connection reads use (SQLite: writes too)
        self._write_lock = self._lock
        self._write_db: Database | None = None  # PostgreSQL's write connection, once opened
        self._writer: int | None = None  # the thread whose transaction is open
        self._local = threading.local()  # per thread: generation before its last commit
        self._writing = False  # a transaction is open (only its thread can see True)
        # how long a write transaction waits for another process's (None: without a limit);
        # set through Catalog.write_wait_s
        self.write_wait_s: float | None = None
        self._warned_damaged: set[tuple[str, int]] = set()  # non-finite rows warned of
        server = is_server_target(target)
        self.path: Path | None = None if server else Path(target)
        if self.path is not None:
            if readonly and not self.path.exists():
                raise CatalogError(f"{self.path}: catalog database not found")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        try:
            self._db: Database = connect(target, readonly=readonly, alone=alone)
        except sqlite3.DatabaseError as exc:
            storage = sqlite_storage_failure(exc)
            if storage is not None:  # not the database's fault: say so, not "unusable"
                raise CatalogStorageError(
                    f"{target}: cannot open the catalog database: {storage}"
                ) from None
            raise CatalogError(f"{target}: not a usable catalog database ({exc})") from None
        self.engine: str = self._db.engine
        if isinstance(self._db, PostgresDatabase):
            self._write_lock = threading.RLock()
        self.location: str = self._db.location
        self.target = str(target)  # what open_store opens again (another process's copy)
        try:
            self.dim = self._open_schema(dim)
        except sqlite3.DatabaseError as exc:
            self.close()
            storage = sqlite_storage_failure(exc)
            if storage is not None:
                raise CatalogStorageError(
                    f"{self.location}: cannot open the catalog database: {storage}"
                ) from None
            raise CatalogError(f"{self.location}: not a usable catalog database ({exc})") from None
        except BaseException:
            self.close()
            raise

    def _open_schema(self, dim: int | None) -> int | None:
        """Check (read-only) or migrate the schema; returns the vector dimension."""
        if self.readonly:
            migrations.check_version(self._db)
        else:
            with self.transaction(bump=False) as db:  # opening a catalog is not a write
                if isinstance(db, PostgresDatabase):
                    self._create_vector_extension(db)
                migrations.migrate(db, dim)
                if dim is not None:
                    db.execute(
                        "INSERT INTO meta(key, value) VALUES ('vector_dim', ?)"
                        " ON CONFLICT DO NOTHING",
                        (str(int(dim)),),
                    )
            if isinstance(self._db, PostgresDatabase):  # the extension may be new
                self._db.ensure_vector_type()
            self._has_change_log = True  # the migrations made it
        stored = self.get_meta("vector_dim") if self._db.table_exists("meta") else None
        if stored is not None and dim is not None and int(stored) != int(dim):
            raise CatalogError(
                f"{self.location}: the catalog holds vectors of dimension {stored}, not {dim}"
            )
        return int(stored) if stored is not None else dim

    @staticmethod
    def _create_vector_extension(db: PostgresDatabase) -> None:
        exists = db.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
        if exists is None:
            try:
                db.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except CatalogUnavailableError:
                raise
            except CatalogError as exc:
                raise pgvector_missing(db.location, exc) from None
        db.ensure_vector_type()

    def close(self) -> None:
        with self._write_lock, self._lock:
            self._db.close()
            if self._write_db is not None:
                self._write_db.close()

    def _writer_db(self) -> Database:
        """The connection write transactions run on (call holding ``_write_lock``)."""
        if not isinstance(self._db, PostgresDatabase):
            return self._db
        if self._write_db is None:
            self._write_db = PostgresDatabase(self._db.dsn, readonly=self.readonly)
        return self._write_db

    def open_reader(self) -> Database:
        """A second, read-only connection to the same database, for a reader that must not
        queue behind this store's lock (a write transaction holds it to its end): the pgvector
        search of a server catalog. The caller closes it and serialises its own calls."""
        if self.path is not None:
            return connect(self.path, readonly=True)
        assert isinstance(self._db, PostgresDatabase)
        return PostgresDatabase(self._db.dsn, readonly=True)

    @contextmanager
    def waiting_until(self, deadline: float | None) -> Iterator[None]:
        """This thread's write transactions in the block wait for other writers until
        ``deadline`` (monotonic) at most, what is left of :attr:`write_wait_s` once the
        caller waited for its own locks (None: :attr:`write_wait_s` itself)."""
        before = getattr(self._local, "deadline", None)
        self._local.deadline = deadline
        try:
            yield
        finally:
            self._local.deadline = before

    def _wait_left(self) -> float | None:
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return self.write_wait_s
        return max(0.0, deadline - time.monotonic())

    @contextmanager
    def transaction(self, bump: bool = True) -> Iterator[Database]:
        """One write transaction. Writers queue rather than fail: SQLite ``BEGIN IMMEDIATE``;
        PostgreSQL ``BEGIN`` + ``pg_advisory_xact_lock`` (across processes and hosts).

        ``bump`` advances ``generation`` (every content change must, so caches notice). A
        connection lost inside rolls everything back and raises CatalogUnavailableError."""
        with self._write_lock:
            if self._writing:  # PostgreSQL would commit the outer one at the inner COMMIT
                raise CatalogError(f"{self.location}: a write transaction is already open")
            db = self._writer_db()
            try:
                db.begin_write(self._wait_left())
            except CatalogBusyError:  # named by the whole wait, not the part left of it
                raise writers_busy(self.location, self.write_wait_s or 0.0) from None
            self._writing = True
            self._writer = threading.get_ident()
            try:
                yield db
                before = None
                if bump:
                    row = db.execute("SELECT value FROM meta WHERE key = 'generation'")
                    before = int(row.fetchone()[0])
                    db.execute(
                        "UPDATE meta SET value = ? WHERE key = 'generation'", (str(before + 1),)
                    )
                    if self._has_change_log:
                        self._prune_change_log(db)
                db.commit()
                if before is not None:
                    self._local.last_commit = before
            except BaseException:
                db.rollback()
                raise
            finally:
                self._writing = False
                self._writer = None

    def _prune_change_log(self, db: Database) -> None:
        """Inside a write: drop the oldest generations' change-log rows until at most
        :attr:`change_log_rows` are left (whole generations: a generation is in the log
        completely or not at all), and move ``change_log_after`` past them."""
        top = db.execute("SELECT MAX(seq) FROM change_log").fetchone()[0]
        if top is None or top <= self.change_log_rows:
            return
        # seq grows with the generation, so the rows to drop are a prefix by seq
        row = db.execute(
            "SELECT MAX(generation) FROM change_log WHERE seq <= ?", (top - self.change_log_rows,)
        ).fetchone()
        if row[0] is None:  # dropped already
            return
        db.execute("DELETE FROM change_log WHERE generation <= ?", (int(row[0]),))
        self.set_meta(db, CHANGE_LOG_AFTER, str(int(row[0])))

    def _change_log_exists(self) -> bool:
        if not self._has_change_log:
            with self._lock:
                self._has_change_log = self._db.table_exists("change_log")
        return self._has_change_log

    def entry_changes(self, since: int, until: int) -> EntryChanges | None:
        """The image and crop ids the writes of generations (``since``, ``until``] added and
        removed, read from the change log; None when the log does not hold all of them (a
        catalog made before it, a log pruned past ``since``): then compare ids in full."""
        if since < 0 or until < since or not self._change_log_exists():
            return None
        after = self.get_meta(CHANGE_LOG_AFTER)
        if after is None or int(after) > since:  # pruned past it already: no rows to read
            return None
        rows = self._query(
            "SELECT entry, position, added FROM change_log WHERE generation > ?"
            " AND generation <= ? ORDER BY seq",
            (since, until),
        )
        # Read after the rows: a prune that took some of them away had committed by then.
        after = self.get_meta(CHANGE_LOG_AFTER)
        if after is None or int(after) > since:
            return None
        return _entry_changes(since, until, rows)

    def _query(self, sql: str, params: Sequence[Any] = (), binary: bool = False) -> list[Any]:
        if self._writer == threading.get_ident():  # inside its own transaction
            return self._writer_db().execute(sql, params, binary=binary).fetchall()
        with self._lock:
            return self._db.execute(sql, params, binary=binary).fetchall()

    # --- meta -------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, db: Database, key: str, value: str) -> None:
        """Set a meta value inside an open transaction (a server catalog keeps its card here)."""
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def last_commit(self) -> int | None:
        """The generation this thread's latest write transaction started from (it committed
        ``last_commit() -> last_commit() + 1``), or None before its first write."""
        return getattr(self._local, "last_commit", None)

    # --- products ---------------------------------------------------------------------
    def upsert_product(self, db: Database, sku: str, **fields: Any) -> int:
        """Insert or update a product by ``sku`` inside an open transaction; returns its id.

        Only fields given (not None) overwrite stored values; ``attributes`` are merged.
        """
        sku = normalise_sku(sku)
        unknown = set(fields) - set(PRODUCT_FIELDS) - {"attributes"}
        if unknown:
            raise CatalogError(f"unknown product fields {sorted(unknown)}")
        fields = check_product_fields(fields)
        stamp = now()
        forms = sku_forms(sku)
        rows = db.execute(
            f"SELECT id, sku, attributes FROM products WHERE sku IN ({_marks(forms)})", forms
        ).fetchall()
        row = _as_stored(rows, sku)
        attrs = fields.pop("attributes", None) or {}
        values = {k: v for k, v in fields.items() if v is not None}
        if row is not None and row["sku"] != sku:
            values["sku"] = sku  # a legacy row (stored decomposed) takes the stored form now
        if row is None:
            values.setdefault("title", sku)  # a product always has something to show
            cur = db.execute(
                "INSERT INTO products(sku, title, url, price, currency, category, attributes,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    sku,
                    *(values.get(k) for k in PRODUCT_FIELDS),
                    attributes_json(attrs),
                    stamp,
                    stamp,
                ),
            )
            return int(cur.fetchone()[0])
        product_id = int(row["id"])
        if attrs:  # merged into the stored ones (a stored value no reader can use is replaced)
            values["attributes"] = attributes_json(
                {**stored_attributes(row["attributes"], product_id), **attrs}
            )
        if values:
            sets = ", ".join(f"{k} = ?" for k in values)
            db.execute(
                f"UPDATE products SET {sets}, updated_at = ? WHERE id = ?",
                (*values.values(), stamp, product_id),
            )
        return product_id

    def update_product(self, product_id: int, **fields: Any) -> Product:
        with self.transaction() as db:
            product = self.get_product(product_id)
            self.upsert_product(db, product.sku, **fields)
        return self.get_product(product_id)

    def get_product(self, product_id: int) -> Product:
        rows = self._query("SELECT * FROM products WHERE id = ?", (_row_id(product_id, "product"),))
        if not rows:
            raise NotFoundError(f"no product with id {product_id}")
        return _product(rows[0])

    def find_product(self, sku: str) -> Product | None:
        forms = sku_forms(sku)
        rows = self._query(f"SELECT * FROM products WHERE sku IN ({_marks(forms)})", forms)
        row = _as_stored(rows, forms[0])
        return None if row is None else _product(row)

    def products_by_ids(self, ids: Sequence[int]) -> dict[int, Product]:
        out: dict[int, Product] = {}
        ids = [int(i) for i in ids]
        for chunk, marks in _in_lists(ids):
            for row in self._query(f"SELECT * FROM products WHERE id IN ({marks})", chunk):
                out[row["id"]] = _product(row)
        return out

    def products_by_skus(self, skus: Sequence[str]) -> dict[str, Product]:
        """The products holding these skus, by the skus' lookup form (:func:`lookup_sku`; a
        sku held by none is absent); the skus are looked up as :meth:`find_product` does."""
        out: dict[str, Product] = {}
        keys = list(dict.fromkeys(form for sku in skus for form in sku_forms(sku)))
        for chunk, marks in _in_lists(keys):
            for row in self._query(f"SELECT * FROM products WHERE sku IN ({marks})", chunk):
                key = lookup_sku(row["sku"])
                if key not in out or row["sku"] == key:  # the stored form before a legacy one
                    out[key] = _product(row)
        return out

    def list_products(
        self, category: str | None = None, after_id: int = 0, limit: int = 50
    ) -> list[Product]:
        sql = "SELECT * FROM products WHERE id > ?"
        params: list[Any] = [min(int(after_id), MAX_ROW_ID)]
        if category is not None:
            sql += " AND category = ?"
            params.append(category)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [_product(r) for r in self._query(sql, params)]

    def delete_product(self, product_id: int) -> tuple[list[int], list[int]]:
        """Delete a product, its images and crops; returns (image ids, crop ids) removed."""
        with self.transaction() as db:
            return self.delete_product_rows(db, product_id)

    def delete_product_rows(self, db: Database, product_id: int) -> tuple[list[int], list[int]]:
        """:meth:`delete_product` inside an open transaction."""
        product_id = _row_id(product_id, "product")
        if db.execute("SELECT 1 FROM products WHERE id = ?", (product_id,)).fetchone() is None:
            raise NotFoundError(f"no product with id {product_id}")
        image_ids = [r[0] for r in db.execute(
            "SELECT id FROM images WHERE product_id = ?", (product_id,))]  # fmt: skip
        crop_ids = [r[0] for r in db.execute(
            "SELECT c.id FROM crops c JOIN images i ON c.image_id = i.id"
            " WHERE i.product_id = ?", (product_id,))]  # fmt: skip
        shas = [r[0] for r in db.execute(
            "SELECT DISTINCT sha256 FROM images WHERE product_id = ?", (product_id,))]  # fmt: skip
        db.execute("DELETE FROM products WHERE id = ?", (product_id,))
        self._delete_unreferenced_blobs(db, shas)
        return image_ids, crop_ids

    # --- images -----------------------------------------------------------------------
    def product_id_in(self, db: Database, sku: str) -> int | None:
        """The id of the product ``sku`` as the open transaction ``db`` sees it."""
        forms = sku_forms(sku)
        rows = db.execute(
            f"SELECT id, sku FROM products WHERE sku IN ({_marks(forms)})", forms
        ).fetchall()
        row = _as_stored(rows, forms[0])
        return None if row is None else int(row[0])

    def find_image(self, db: Database, product_id: int, sha256: str) -> int | None:
        row = db.execute(
            "SELECT id FROM images WHERE product_id = ? AND sha256 = ?", (product_id, sha256)
        ).fetchone()
        return int(row[0]) if row else None

    def has_image(self, product_id: int, sha256: str) -> bool:
        rows = self._query(
            "SELECT 1 FROM images WHERE product_id = ? AND sha256 = ?", (product_id, sha256)
        )
        return bool(rows)

    def insert_image(
        self,
        db: Database,
        product_id: int,
        *,
        source: str,
        blob: str | None,
        sha256: str,
        width: int,
        height: int,
        vector: NDArray[np.float32],
        crops: Sequence[NewCrop] = (),
    ) -> tuple[int, list[int]]:
        """Insert an image, its vector and its crops in the open transaction. A crop position
        that cannot name an index file is refused (FieldError) before any row is written."""
        if not is_sha256(sha256):
            raise FieldError(f"{source}: sha256 {sha256!r:.80} is not 64 lowercase hex digits")
        for crop in crops:
            problem = crop_position_problem(crop.position)
            if problem is not None:
                raise FieldError(f"{source}: crop position {crop.position!r} {problem}")
        cur = db.execute(
            "INSERT INTO images(product_id, source, blob, sha256, width, height, created_at,"
            " vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (product_id, source, blob, sha256, width, height, now(), db.vector_param(vector)),
        )
        image_id = int(cur.fetchone()[0])
        crop_ids = []
        for c in crops:
            cur = db.execute(
                "INSERT INTO crops(image_id, position, label, score, x1, y1, x2, y2, vector)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (image_id, c.position, c.label, float(c.score), *map(float, c.box),
                 db.vector_param(c.vector)),
            )  # fmt: skip
            crop_ids.append(int(cur.fetchone()[0]))
        return image_id, crop_ids

    def get_image(self, image_id: int) -> ImageRow:
        rows = self._query("SELECT * FROM images WHERE id = ?", (_row_id(image_id, "image"),))
        if not rows:
            raise NotFoundError(f"no image with id {image_id}")
        return _image(rows[0])

    def images_of(self, product_id: int) -> list[ImageRow]:
        product_id = _row_id(product_id, "product")
        rows = self._query("SELECT * FROM images WHERE product_id = ? ORDER BY id", (product_id,))
        return [_image(r) for r in rows]

    def images_of_products(self, product_ids: Sequence[int]) -> dict[int, list[ImageRow]]:
        """Each product's images as :meth:`images_of` gives them (by id), an entry for every id
        asked (empty for a product without images, or none)."""
        ids = [_row_id(i, "product") for i in product_ids]
        out: dict[int, list[ImageRow]] = {i: [] for i in ids}
        for chunk, marks in _in_lists(ids):
            rows = self._query(
                f"SELECT * FROM images WHERE product_id IN ({marks}) ORDER BY id", chunk
            )
            for row in rows:
                out[row["product_id"]].append(_image(row))
        return out

    def delete_images(self, image_ids: Sequence[int]) -> list[int]:
        """Delete images (and their crops); returns the crop ids removed."""
        if not image_ids:
            return []
        with self.transaction() as db:
            return self.delete_image_rows(db, image_ids)

    def delete_image_rows(self, db: Database, image_ids: Sequence[int]) -> list[int]:
        """:meth:`delete_images` inside an open transaction."""
        ids = [int(i) for i in image_ids]
        crop_ids: list[int] = []
        for chunk, marks in _in_lists(ids):
            crop_ids += [r[0] for r in db.execute(
                f"SELECT id FROM crops WHERE image_id IN ({marks})", chunk)]  # fmt: skip
            shas = [r[0] for r in db.execute(
                f"SELECT DISTINCT sha256 FROM images WHERE id IN ({marks})", chunk)]  # fmt: skip
            db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
            self._delete_unreferenced_blobs(db, shas)
        return crop_ids

    # --- blobs kept in the database (a server catalog's thumbnails) ---------------------
    def put_blob(
        self,
        db: Database,
        sha256: str,
        data: bytes,
        media_type: str,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        """Keep ``data`` under ``sha256`` inside an open transaction (a blob already there is
        kept: the key names the image's bytes). Deleted with the last image of that sha256."""
        db.execute(
            "INSERT INTO blobs(sha256, media_type, data, width, height) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (sha256, media_type, bytes(data), width, height),
        )

    def get_blob(self, sha256: str) -> tuple[bytes, str] | None:
        """(data, media type) of the blob kept under ``sha256``, or None."""
        rows = self._query("SELECT data, media_type FROM blobs WHERE sha256 = ?", (sha256,))
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    @staticmethod
    def _delete_unreferenced_blobs(db: Database, shas: Sequence[str]) -> None:
        for chunk, marks in _in_lists(shas):
            db.execute(
                f"DELETE FROM blobs WHERE sha256 IN ({marks}) AND NOT EXISTS"
                " (SELECT 1 FROM images i WHERE i.sha256 = blobs.sha256)",
                chunk,
            )

    # --- blob references (see ``catalog.blobs``) ---------------------------------------
    def references_sha256(self, sha256: str) -> bool:
        """Whether any image row holds these bytes (and so needs their blob file)."""
        return bool(self._query("SELECT 1 FROM images WHERE sha256 = ? LIMIT 1", (sha256,)))

    def blob_refs_with_prefix(self, prefix: str) -> list[tuple[str, str | None]]:
        """Distinct (sha256, blob) of the images whose sha256 starts with hex ``prefix``."""
        rows = self._query(
            "SELECT DISTINCT sha256, blob FROM images WHERE sha256 >= ? AND sha256 < ?",
            (prefix, prefix + "~"),  # "~" sorts after every hex digit: an index range scan
        )
        return [(r[0], r[1]) for r in rows]

    def blob_refs_of_product(self, product_id: int) -> list[tuple[str, str | None]]:
        """(sha256, blob) of a product's images."""
        product_id = _row_id(product_id, "product")
        rows = self._query("SELECT sha256, blob FROM images WHERE product_id = ?", (product_id,))
        return [(r[0], r[1]) for r in rows]

    def blob_refs_of_images(self, image_ids: Sequence[int]) -> list[tuple[str, str | None]]:
        """(sha256, blob) of the given images (unknown ids are skipped)."""
        out: list[tuple[str, str | None]] = []
        ids = [int(i) for i in image_ids]
        for chunk, marks in _in_lists(ids):
            rows = self._query(f"SELECT sha256, blob FROM images WHERE id IN ({marks})", chunk)
            out += [(r[0], r[1]) for r in rows]
        return out

    def image_product_map(self, image_ids: Sequence[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        ids = [int(i) for i in image_ids]
        for chunk, marks in _in_lists(ids):
            for row in self._query(
                f"SELECT id, product_id FROM images WHERE id IN ({marks})", chunk
            ):
                out[row[0]] = row[1]
        return out

    def crop_rows(self, crop_ids: Sequence[int]) -> dict[int, tuple[CropRow, int]]:
        """crop id -> (crop, product id)."""
        out: dict[int, tuple[CropRow, int]] = {}
        ids = [int(i) for i in crop_ids]
        for chunk, marks in _in_lists(ids):
            for r in self._query(
                "SELECT c.*, i.product_id FROM crops c JOIN images i ON c.image_id = i.id"
                f" WHERE c.id IN ({marks})", chunk,
            ):  # fmt: skip
                crop = CropRow(r["id"], r["image_id"], r["position"], r["label"], r["score"],
                               (r["x1"], r["y1"], r["x2"], r["y2"]))  # fmt: skip
                out[crop.id] = (crop, r["product_id"])
        return out

    def crops_of_images(self, image_ids: Sequence[int]) -> dict[int, list[CropRow]]:
        """Each image's crops as :meth:`crops_of_image` gives them (by id), an entry for every
        id asked."""
        ids = [int(i) for i in image_ids]
        out: dict[int, list[CropRow]] = {i: [] for i in ids}
        for chunk, marks in _in_lists(ids):
            for r in self._query(
                f"SELECT * FROM crops WHERE image_id IN ({marks}) ORDER BY id", chunk
            ):
                box = (r["x1"], r["y1"], r["x2"], r["y2"])
                crop = CropRow(r["id"], r["image_id"], r["position"], r["label"], r["score"], box)
                out[crop.image_id].append(crop)
        return out

    def crops_of_image(self, image_id: int) -> list[CropRow]:
        rows = self._query("SELECT * FROM crops WHERE image_id = ? ORDER BY id", (image_id,))
        return [CropRow(r["id"], r["image_id"], r["position"], r["label"], r["score"],
                        (r["x1"], r["y1"], r["x2"], r["y2"])) for r in rows]  # fmt: skip

    # --- product filters, in SQL --------------------------------------------------------
    def product_ids_where(
        self,
        category: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
    ) -> NDArray[np.int64]:
        """Ids of the products in ``category`` priced within [``min_price``, ``max_price``]
        (a price bound excludes products without a price), ascending."""
        where, params = _product_conditions(category, min_price, max_price)
        rows = self._query(f"SELECT p.id FROM products p {where} ORDER BY p.id", params)
        return np.array([r[0] for r in rows], dtype=np.int64)

    def entry_ids_where(
        self,
        position: str | None,
        category: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
    ) -> NDArray[np.int64]:
        """Image ids (``position`` None), or the crop ids of ``position``, whose product
        passes the conditions of :meth:`product_ids_where`, ascending: one join in the
        database instead of every entry's product read into Python."""
        where, params = _product_conditions(category, min_price, max_price)
        if position is None:
            sql = f"SELECT i.id FROM images i JOIN products p ON p.id = i.product_id {where}"
            sql += " ORDER BY i.id"
        else:
            where = f"{where} AND c.position = ?" if where else "WHERE c.position = ?"
            params.append(position)
            sql = ("SELECT c.id FROM crops c JOIN images i ON i.id = c.image_id"
                   f" JOIN products p ON p.id = i.product_id {where} ORDER BY c.id")  # fmt: skip
        return np.array([r[0] for r in self._query(sql, params)], dtype=np.int64)

    # --- vectors, for index rebuilds --------------------------------------------------
    def image_ids(self) -> NDArray[np.int64]:
        return np.array([r[0] for r in self._query("SELECT id FROM images")], dtype=np.int64)

    def crop_ids(self, position: str) -> NDArray[np.int64]:
        rows = self._query("SELECT id FROM crops WHERE position = ?", (position,))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def entry_owners(self, position: str | None) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(entry ids ascending, their products): every image (``position`` None) or every
        crop at ``position``, in one query."""
        if position is None:
            rows = self._query("SELECT id, product_id FROM images ORDER BY id")
        else:
            rows = self._query(
                "SELECT c.id, i.product_id FROM crops c JOIN images i ON c.image_id = i.id"
                " WHERE c.position = ? ORDER BY c.id",
                (position,),
            )
        pairs = np.array([(r[0], r[1]) for r in rows], np.int64).reshape(-1, 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    def crop_positions(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT position FROM crops ORDER BY 1")]

    def iter_vectors(
        self,
        table: str,
        dim: int,
        ids: Sequence[int] | None = None,
        position: str | None = None,
        batch: int = 4096,
        *,
        damaged: bool = False,
    ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
        """Stream (ids, vectors) from ``images`` or ``crops`` in batches. A vector that is
        not finite (NaN or inf: insert refuses one, so the store was written by other code,
        or damaged) is left out, with a warning once per row, unless ``damaged``: no index
        takes one, and a search would rank it anywhere (``snapshop catalog check`` lists
        them)."""
        if table not in ("images", "crops"):
            raise ValueError(table)
        if ids is not None:
            id_list = [int(i) for i in ids]
            for chunk, marks in _in_lists(id_list):
                rows = self._query(
                    f"SELECT id, vector FROM {table} WHERE id IN ({marks})", chunk, binary=True
                )
                if rows:
                    yield self._finite(table, *self._unpack(rows, dim), damaged)
            return
        where, params = ("WHERE position = ?", [position]) if position else ("", [])
        last = 0
        while True:
            sep = "AND" if where else "WHERE"
            rows = self._query(
                f"SELECT id, vector FROM {table} {where} {sep} id > ? ORDER BY id LIMIT ?",
                [*params, last, batch],
                binary=True,
            )
            if not rows:
                return
            last = rows[-1][0]
            yield self._finite(table, *self._unpack(rows, dim), damaged)

    def _finite(
        self, table: str, ids: NDArray[np.int64], vecs: NDArray[np.float32], damaged: bool
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        finite = np.isfinite(vecs).all(axis=1)
        if damaged or finite.all():
            return ids, vecs
        bad = {(table, int(i)) for i in ids[~finite]} - self._warned_damaged
        if bad:
            self._warned_damaged |= bad
            log.warning(
                "%s: %d stored %s vectors are not finite (NaN or inf), e.g. %s %d: left out"
                " of every index and search (`snapshop catalog check` lists them)",
                self.location, len(bad), table[:-1], table[:-1], min(i for _, i in bad),
            )  # fmt: skip
        return ids[finite], vecs[finite]

    def _unpack(self, rows: list[Any], dim: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        data = b"".join(r[1] for r in rows)
        if len(data) != 4 * dim * len(rows):
            raise CatalogError(
                f"stored vectors do not have the catalog's dimension {dim} (catalog card edited?)"
            )
        vecs = np.frombuffer(data, dtype=self._db.vector_dtype).reshape(len(rows), dim)
        return ids, vecs.astype(np.float32, copy=False)

    # --- stats ------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        row = self._query(
            "SELECT (SELECT COUNT(*) FROM products) AS products,"
            " (SELECT COUNT(*) FROM images) AS images, (SELECT COUNT(*) FROM crops) AS crops"
        )[0]
        return {"products": row["products"], "images": row["images"], "crops": row["crops"]}
