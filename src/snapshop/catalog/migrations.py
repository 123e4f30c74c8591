"""Versioned schema migrations of the catalog database, one mechanism for SQLite and PostgreSQL.

Migrations are an ordered list in code; version 1 is the schema the first SQLite catalogs were
made with. A ``schema_migrations(version, name, applied_at)`` table records what a database has.
At open, the store runs :func:`migrate` inside one write transaction (the writers' lock makes
two processes opening a catalog at once safe: the second finds nothing pending). A database
newer than this code is refused, naming both versions; a catalog made before this table existed
(``meta.schema_version = 1`` and no ``schema_migrations``) is adopted as version 1 as it is.

The DDL is written once with type placeholders (:func:`snapshop.catalog.sql.render_ddl`);
``meta.schema_version`` follows the latest version, so older code refuses a newer catalog too.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from snapshop.catalog.sql import Database, change_log_triggers, render_ddl
from snapshop.errors import CatalogError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    ddl: str  # for both engines (see render_ddl)
    postgresql: str = ""  # extra statements for PostgreSQL only (vector indexes)
    # engine -> statements run whole, after the DDL (trigger bodies hold ';')
    statements: Callable[[str], list[str]] | None = None


HNSW_M, HNSW_EF_CONSTRUCTION = 16, 64  # pgvector's defaults
HNSW = (
    "USING hnsw (vector vector_ip_ops)"
    f" WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema: meta, products, images, crops",
        """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS products (
    id {pk},
    sku TEXT NOT NULL UNIQUE,
    title TEXT, url TEXT, price {real}, currency TEXT, category TEXT,
    attributes TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS products_category ON products(category);
CREATE TABLE IF NOT EXISTS images (
    id {pk},
    product_id {ref} NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    blob TEXT,
    sha256 {hex} NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    vector {vector} NOT NULL,
    UNIQUE (product_id, sha256)
);
CREATE INDEX IF NOT EXISTS images_product ON images(product_id);
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
CREATE TABLE IF NOT EXISTS crops (
    id {pk},
    image_id {ref} NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    position TEXT NOT NULL, label TEXT NOT NULL, score {real} NOT NULL,
    x1 {real} NOT NULL, y1 {real} NOT NULL, x2 {real} NOT NULL, y2 {real} NOT NULL,
    vector {vector} NOT NULL
);
CREATE INDEX IF NOT EXISTS crops_image ON crops(image_id);
CREATE INDEX IF NOT EXISTS crops_position ON crops(position);
""",
        postgresql=f"""
CREATE INDEX IF NOT EXISTS images_vector ON images {HNSW};
CREATE INDEX IF NOT EXISTS crops_vector ON crops {HNSW};
""",
    ),
    Migration(
        2,
        "blobs: image bytes and thumbnails kept in the database (server catalogs)",
        """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 {hex} PRIMARY KEY,
    media_type TEXT NOT NULL,
    data {bytes} NOT NULL,
    width INTEGER, height INTEGER
);
""",
    ),
    Migration(
        3,
        "change_log: the image and crop ids each write added or removed (replica refresh)",
        # change_log_after: the log holds every change of the generations after this one
        """
CREATE TABLE IF NOT EXISTS change_log (
    seq {pk},
    generation {ref} NOT NULL,
    entry {ref} NOT NULL,
    position TEXT,
    added INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS change_log_generation ON change_log(generation);
INSERT INTO meta(key, value) VALUES ('change_log_after',
    COALESCE((SELECT value FROM meta WHERE key = 'generation'), '0')) ON CONFLICT DO NOTHING
""",
        statements=change_log_triggers,
    ),
)
LATEST = MIGRATIONS[-1].version

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL
)"""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _too_new(db: Database, version: int) -> CatalogError:
    return CatalogError(
        f"{db.location}: catalog schema version {version} is newer than this snapshop "
        f"supports (version {LATEST}): upgrade snapshop"
    )


def current_version(db: Database) -> int:
    """The schema version ``db`` holds: 0 for an empty database."""
    if db.table_exists("schema_migrations"):
        row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)
    if db.table_exists("meta"):  # made before migrations were recorded
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0
    return 0


def check_version(db: Database) -> int:
    """The version of a database opened read-only (nothing is applied): a newer one than this
    code is refused; an older one is read as it is (its writer will migrate it)."""
    version = current_version(db)
    if version > LATEST:
        raise _too_new(db, version)
    return version


def migrate(db: Database, dim: int | None) -> list[int]:
    """Bring ``db`` to :data:`LATEST` inside the caller's open write transaction; returns the
    versions applied. ``dim`` is needed where PostgreSQL vector columns are created."""
    db.execute(MIGRATIONS_TABLE)
    row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    version = int(row[0] or 0)
    if version == 0 and db.table_exists("meta"):
        legacy = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if legacy is not None:
            version = int(legacy[0])
            if version > LATEST:
                raise _too_new(db, version)
            for m in MIGRATIONS[:version]:  # adopted as they are: their tables exist
                db.execute(
                    "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                    (m.version, f"{m.name} (adopted)", _now()),
                )
    if version > LATEST:
        raise _too_new(db, version)
    applied = []
    for m in MIGRATIONS[version:]:
        log.info("%s: applying schema migration %d (%s)", db.location, m.version, m.name)
        statements = render_ddl(m.ddl, db.engine, dim)
        if db.engine == "postgresql" and m.postgresql:
            statements += render_ddl(m.postgresql, db.engine, dim)
        if m.statements is not None:
            statements += m.statements(db.engine)
        for statement in statements:
            db.execute(statement)
        db.execute(
            "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
            (m.version, m.name, _now()),
        )
        applied.append(m.version)
    db.execute(
        "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(LATEST),),
    )
    db.execute("INSERT INTO meta(key, value) VALUES ('generation', '0') ON CONFLICT DO NOTHING")
    return applied
