"""The catalog's dialect layer: one connection to SQLite or PostgreSQL behind one interface.

The store writes each statement once, in the SQL both engines accept, with ``?`` placeholders
(``INSERT ... RETURNING id`` and ``ON CONFLICT DO NOTHING`` work on SQLite >= 3.35 too). A
:class:`Database` hides what still differs: placeholder style, DDL types
(:func:`render_ddl`), vector encoding (:meth:`Database.vector_param`, :attr:`vector_dtype`),
the writers' lock (``BEGIN IMMEDIATE`` vs ``pg_advisory_xact_lock``), reconnecting after a
lost server connection, and translating driver errors into :mod:`snapshop.errors`.

Why not SQLAlchemy Core: docs/deploy.md ("Choice of SQL layer").
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import unquote

import numpy as np
from numpy.typing import NDArray

from snapshop.errors import CatalogBusyError, CatalogError, CatalogUnavailableError

log = logging.getLogger(__name__)


def writers_busy(location: str, wait_s: float) -> CatalogBusyError:
    """The error of a write that waited ``wait_s`` for another writer in vain."""
    return CatalogBusyError(
        f"{location}: another writer held the catalog for more than {wait_s:g} s (an ingest,"
        " a reindex, a migration?); this write was not made: retry later"
    )


SERVER_SCHEMES = ("postgresql://", "postgres://")
# How long a SQLite connection waits for another's lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0
# pg_advisory_xact_lock key every catalog writer takes ("snapcat" in ASCII): advisory locks
# are per database, so catalogs in different databases of one server do not contend.
WRITER_LOCK_KEY = 0x736E6170636174
# libpq settings unless the DSN sets them: an unreachable host fails in seconds rather than
# hanging, and TCP keepalives notice a peer gone silent (a dropped network path, a failed-over
# host) within about a minute instead of the kernel's two hours. Unix sockets ignore them.
# tcp_user_timeout (ms) covers what keepalives do not: a request sent into a dropped path
# stays unacknowledged, and the kernel retransmits it for about 15 minutes before giving up.
CONNECT_DEFAULTS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
# statement_timeout of a statement outside a write transaction (a query), unless the DSN or
# PGOPTIONS sets one: a stalled database then costs a request this long, not forever. Write
# transactions lift it (SET LOCAL), since bulk writes, schema migrations and their HNSW
# builds, and the wait for other writers' lock may rightly take longer.
QUERY_TIMEOUT_S = 30.0
# A write transaction whose client stops talking mid-write (its host frozen or cut off) holds
# the writers' lock, and so stops every writer on every host, until the server's TCP keepalive
# gives up (two hours by default): the server ends one idle this long, rolling it back, unless
# the DSN or PGOPTIONS sets idle_in_transaction_session_timeout. Between its statements a write
# does in-memory work only (images are embedded before the transaction begins).
WRITE_IDLE_TIMEOUT_S = 60.0
# A backend that cannot even enforce its statement_timeout (stopped, or its host frozen)
# answers nothing while TCP stays healthy; the client gives up this much later.
CLIENT_GRACE_S = 10.0


def is_server_target(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names a PostgreSQL database (a DSN) rather than a SQLite file."""
    return isinstance(target, str) and target.lower().startswith(SERVER_SCHEMES)


# The userinfo runs to the *last* '@' before the host: a password may hold '@', '/', '?' or
# ':' unencoded (libpq then misparses it, and the message quotes the pieces). An '@' in the
# query makes this mask more than the password, never less.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)(.*)@(?=[^@/?#]*(?:[/?#]|$))", re.DOTALL)
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)([^&#]*)")


def mask_dsn(dsn: str) -> str:
    """``dsn`` for display: the password replaced by ``***`` (in the URL and in a query)."""
    userinfo = _USERINFO.match(dsn)
    if userinfo is not None and ":" in userinfo.group(2):
        user = userinfo.group(2).split(":", 1)[0]
        dsn = f"{userinfo.group(1)}{user}:***@{dsn[userinfo.end() :]}"
    return _QUERY_PASSWORD.sub(r"\1***", dsn)


def scrub_password(text: str, dsn: str) -> str:
    """``text`` (a driver's message about ``dsn``) without the DSN's password: as written,
    percent-decoded, and the pieces libpq makes of one it misparses (it splits at '@', '/',
    ':', '?'; pieces under 4 characters are left, they would garble the rest of the text)."""
    found = []
    userinfo = _USERINFO.match(dsn)
    if userinfo is not None and ":" in userinfo.group(2):
        found.append(userinfo.group(2).split(":", 1)[1])
    found += [m.group(2) for m in _QUERY_PASSWORD.finditer(dsn)]
    secrets: set[str] = set()
    for password in found:
        for form in (password, unquote(password)):
            secrets.add(form)
            secrets.update(p for p in re.split(r"[@/:?#]", form) if len(p) >= 4)
    for secret in sorted(secrets, key=len, reverse=True):  # whole before pieces
        if secret:
            text = text.replace(secret, "***")
    return text


# --- DDL ---------------------------------------------------------------------------------
_DDL_TYPES = {
    "sqlite": {
        "pk": "INTEGER PRIMARY KEY AUTOINCREMENT",  # AUTOINCREMENT: ids are never reused
        "ref": "INTEGER",
        "real": "REAL",
        "bytes": "BLOB",
        "hex": "TEXT",
    },
    "postgresql": {
        "pk": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",  # a sequence: never reused
        "ref": "bigint",
        "real": "double precision",  # PostgreSQL's REAL is 4 bytes; SQLite's is 8
        "bytes": "bytea",
        # Byte order, so a sha256 prefix range (``>= 'ab' AND < 'ab~'``) is an index range
        # whatever the database's default collation.
        "hex": 'TEXT COLLATE "C"',
    },
}


def render_ddl(template: str, engine: str, dim: int | None) -> list[str]:
    """The statements of ``template`` for ``engine``: ``{pk}``, ``{ref}``, ``{real}``,
    ``{bytes}``, ``{hex}`` and ``{vector}`` (SQLite: a float32 BLOB; PostgreSQL: pgvector's
    ``vector(dim)``) become that engine's types."""
    types = dict(_DDL_TYPES[engine])
    if engine == "postgresql":
        if dim is None and "{vector}" in template:  # a later migration may make no vectors
            raise CatalogError("creating a PostgreSQL catalog needs the vector dimension (dim)")
        types["vector"] = f"vector({int(dim or 0)})"
    else:
        types["vector"] = "BLOB"
    text = template.replace("{", "\0").replace("}", "\1")
    for name, value in types.items():
        text = text.replace(f"\0{name}\1", value)
    text = text.replace("\0", "{").replace("\1", "}")
    return [s.strip() for s in text.split(";") if s.strip()]


# --- the change log ----------------------------------------------------------------------
# The generation a write produces: the store bumps ``meta.generation`` at the end of each write
# transaction, so a row written inside it belongs to the generation after the stored one.
_NEXT_GENERATION = {
    "sqlite": "(SELECT CAST(value AS INTEGER) + 1 FROM meta WHERE key = 'generation')",
    "postgresql": "(SELECT value::bigint + 1 FROM meta WHERE key = 'generation')",
}
# (table, the row's index position: NULL for an image, a crop's garment position)
_LOGGED_TABLES = (("images", "NULL"), ("crops", "{row}.position"))


def change_log_triggers(engine: str) -> list[str]:
    """Statements (each run whole: trigger bodies hold ';') that make every insert into and
    delete from ``images`` and ``crops`` record the row's id, its index position and
    whether it came or went in ``change_log``, tagged with the generation the write produces.

    Triggers rather than the store's write paths: deletes that cascade from a product or an
    image, and any later statement that adds or removes rows, are recorded too. SQLite fires
    them per row; PostgreSQL per statement, over the statement's transition table (one
    insert however many rows a bulk load or a cascade touches)."""
    generation = _NEXT_GENERATION[engine]
    statements = []
    for table, position in _LOGGED_TABLES:
        for event, added, row in (("INSERT", 1, "new"), ("DELETE", 0, "old")):
            name = f"change_log_{table}_{event.lower()}"
            where = position.format(row=row)
            if engine == "sqlite":
                statements.append(
                    f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON {table} BEGIN"
                    " INSERT INTO change_log(generation, entry, position, added)"
                    f" VALUES ({generation}, {row}.id, {where}, {added}); END"
                )
                continue
            rows = f"{row}_rows"  # the alias is not NEW/OLD: plpgsql's own variables
            statements += [
                f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN INSERT INTO change_log(generation, entry, position, added)"
                f" SELECT {generation}, r.id, {position.format(row='r')}, {added} FROM {rows} r;"
                " RETURN NULL; END $$",
                f"DROP TRIGGER IF EXISTS {name} ON {table}",
                f"CREATE TRIGGER {name} AFTER {event} ON {table}"
                f" REFERENCING {row.upper()} TABLE AS {rows}"
                f" FOR EACH STATEMENT EXECUTE FUNCTION {name}()",
            ]
    return statements


# --- rows --------------------------------------------------------------------------------
class Row(tuple[Any, ...]):
    """A result row read by position or by column name (like ``sqlite3.Row``)."""

    __slots__ = ()
    _index: ClassVar[dict[str, int]] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                key = self._index[key]
            except KeyError:
                raise IndexError(f"no column named {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def _pg_row_factory(cursor: Any) -> Any:
    if cursor.description is None:
        return tuple
    return _row_class(tuple(d.name for d in cursor.description))


@functools.lru_cache(maxsize=1024)
def _pg_placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


# --- connections -------------------------------------------------------------------------
class Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Database:
    """One connection to a catalog database. Not thread-safe: the store serialises calls.

    ``execute`` runs one statement (``?`` placeholders, so no literal ``?`` in the SQL text:
    pass such values as parameters) and returns a cursor whose rows read by position and by
    name. Driver errors come out as :mod:`snapshop.errors` types.
    """

    engine: str
    location: str
    vector_dtype: str  # numpy dtype of stored float32 vector bytes

    def execute(self, sql: str, params: Sequence[Any] = (), *, binary: bool = False) -> Cursor:
        raise NotImplementedError

    def vector_param(self, vector: NDArray[np.float32]) -> Any:
        """``vector`` (dim,) as a parameter for a vector column."""
        raise NotImplementedError

    def table_exists(self, name: str) -> bool:
        raise NotImplementedError

    def begin_write(self, wait_s: float | None = None) -> None:
        """Start a write transaction, waiting for other writers (processes and hosts): at
        most ``wait_s`` where the wait can be bounded (CatalogBusyError), else without a
        limit."""
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """A SQLite file in WAL mode; ``BEGIN IMMEDIATE`` makes writers queue, not fail."""

    engine = "sqlite"
    vector_dtype = "<f4"

    def __init__(self, path: Path, alone: bool = False) -> None:
        """``alone``: the exclusive locking mode, taken before the first read, so the WAL
        index lives in this process's memory and no ``-shm`` file must be made or grown,
        which a full disk refuses; every other connection waits until this one closes."""
        self.path = Path(path)
        self.location = str(self.path)
        self._db = sqlite3.connect(
            self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        try:
            if alone:
                self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._enter_wal_mode()
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        except BaseException:
            self._db.close()  # its locks would stop the next connection of this process
            raise

    def _enter_wal_mode(self) -> None:
        """``PRAGMA journal_mode=WAL``, waiting up to the busy timeout for other connections.

        On a database not yet in WAL mode (a new catalog) the pragma reads the header under a
        shared lock, then upgrades to a write to change it. SQLite answers that upgrade with
        SQLITE_BUSY at once, without its busy handler, while another connection holds the
        write lock (deadlock avoidance: https://sqlite.org/c3ref/busy_handler.html), so
        openers of a new catalog racing each other failed. The failed pragma released its
        lock, and once the other has converted the file the retry finds WAL and writes nothing.
        An existing WAL catalog succeeds at the first try, as before.
        """
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        delay = 0.001
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def execute(self, sql: str, params: Sequence[Any] = (), *, binary: bool = False) -> Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise CatalogError(f"{self.location}: {exc}") from None
        except sqlite3.OperationalError as exc:
            reason = sqlite_storage_failure(exc)
            if reason is None:
                raise
            raise CatalogError(
                f"{self.location}: {reason}; nothing of this write was stored"
            ) from None

    def vector_param(self, vector: NDArray[np.float32]) -> bytes:
        return np.ascontiguousarray(vector, dtype=np.float32).tobytes()

    def table_exists(self, name: str) -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._db.execute(sql, (name,)).fetchone() is not None

    def begin_write(self, wait_s: float | None = None) -> None:
        # a directory catalog's writers queue on its flock first (Catalog.write_lock), which
        # bounds their wait; SQLite's own busy timeout stays the backstop
        self._db.execute("BEGIN IMMEDIATE")

    def rollback(self) -> None:
        # A COMMIT that failed for a full disk (or an I/O error) was rolled back by SQLite
        # already; a second ROLLBACK would raise and hide why.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()


def sqlite_storage_failure(exc: sqlite3.Error) -> str | None:
    """What a SQLite error says about the storage (the disk full, an I/O error), or None
    for any other error."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return "the disk is full"
    if code == sqlite3.SQLITE_IOERR:
        return f"disk I/O error, is the disk full or failing? ({exc})"
    return None


class PgVector:
    """A float32 vector bound for a pgvector column (sent in pgvector's binary format)."""

    __slots__ = ("array",)

    def __init__(self, array: NDArray[np.float32]) -> None:
        self.array = array


class PostgresDatabase(Database):
    """A PostgreSQL database with pgvector, over psycopg 3 in autocommit mode (statements
    outside :meth:`begin_write` are their own transactions).

    A connection found broken (server restart, failover, a terminated backend) is replaced on
    the next call; a read that fails because the connection dropped under it is retried once
    on a new connection. Inside a write transaction nothing is retried: the transaction is
    lost, the caller gets :class:`CatalogUnavailableError` and may run it again.
    """

    engine = "postgresql"
    vector_dtype = ">f4"  # pgvector's binary format is big-endian float32

    def __init__(self, dsn: str, readonly: bool = False) -> None:
        try:
            import psycopg
        except ImportError:
            raise CatalogError(
                f"{mask_dsn(dsn)}: a PostgreSQL catalog needs psycopg"
                " (pip install 'snapshop[pgvector]')"
            ) from None

        self._psycopg = psycopg
        self.dsn = dsn
        self.location = mask_dsn(dsn)
        self.readonly = readonly
        self.in_transaction = False
        self.closed = False  # by close(): never reconnected
        self._vector_oid: int | None = None
        self._conn: Any = None
        self._own_timeout = False  # whether the statement_timeout is ours (QUERY_TIMEOUT_S)
        self._own_idle_timeout = False  # and idle_in_transaction_session_timeout
        self._deadline = _Deadline(self.location)
        self._connect()

    # connection management
    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            params = self._connect_params()
            conn = psycopg.connect(autocommit=True, row_factory=_pg_row_factory, **params)
        except psycopg.Error as exc:
            reason = scrub_password(_connect_reason(exc), self.dsn)
            raise CatalogUnavailableError(
                f"{self.location}: catalog database unreachable: {reason}"
            ) from None
        self._conn = conn
        try:
            if self.readonly:
                conn.execute("SET default_transaction_read_only = on")
            self._register_vector(conn)
        except psycopg.Error as exc:
            raise self._translate(exc) from None

    def _connect_params(self) -> dict[str, Any]:
        """The DSN's parameters with :data:`CONNECT_DEFAULTS` and the query timeout added
        where it sets none (its ``options`` and ``$PGOPTIONS`` are kept)."""
        from psycopg.conninfo import conninfo_to_dict

        params: dict[str, Any] = conninfo_to_dict(self.dsn)
        for key, value in CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        options = str(params.get("options", os.environ.get("PGOPTIONS", "")))
        self._own_timeout = "statement_timeout" not in options
        self._own_idle_timeout = "idle_in_transaction_session_timeout" not in options
        if self._own_timeout:
            timeout = f"-c statement_timeout={int(QUERY_TIMEOUT_S * 1000)}"
            params["options"] = f"{options} {timeout}".strip()
        return params

    def _register_vector(self, conn: Any) -> None:
        """Binary dumper and loader for pgvector's type, once the extension exists."""
        from psycopg.adapt import Dumper, Loader
        from psycopg.pq import Format

        row = conn.execute("SELECT to_regtype('vector')::oid").fetchone()
        if row is None or row[0] is None:
            return
        self._vector_oid = oid = int(row[0])

        class VectorDumper(Dumper):
            format = Format.BINARY

            def dump(self, obj: PgVector) -> bytes:
                arr = obj.array
                return struct.pack(">HH", len(arr), 0) + arr.astype(">f4").tobytes()

        VectorDumper.oid = oid

        class VectorLoader(Loader):
            format = Format.BINARY

            def load(self, data: Any) -> bytes:
                return bytes(data[4:])  # after int16 dim + int16 unused

        conn.adapters.register_dumper(PgVector, VectorDumper)
        conn.adapters.register_loader(oid, VectorLoader)

    def ensure_vector_type(self) -> None:
        """Register the vector adapters (after ``CREATE EXTENSION vector`` on this connection)."""
        if self._vector_oid is None:
            with self.translated():
                self._register_vector(self._conn)

    @property
    def broken(self) -> bool:
        return self._conn is None or self._conn.closed or self._conn.broken

    def _reconnect_if_broken(self) -> None:
        if self.closed:
            raise CatalogError(f"{self.location}: the catalog store is closed")
        if self.broken and not self.in_transaction:
            log.warning("%s: connection lost, reconnecting", self.location)
            old, self._conn = self._conn, None
            if old is not None:
                old.close()
            self._connect()

    def _translate(self, exc: Exception) -> CatalogError:
        if self._deadline.fired:
            return CatalogUnavailableError(
                f"{self.location}: catalog database did not answer within"
                f" {QUERY_TIMEOUT_S + CLIENT_GRACE_S:.0f} s"
            )
        error = translate_pg_error(exc, self.location, lost=self.broken)
        return type(error)(scrub_password(str(error), self.dsn))

    def execute(self, sql: str, params: Sequence[Any] = (), *, binary: bool = False) -> Cursor:
        psycopg = self._psycopg
        self._reconnect_if_broken()
        if self.broken:  # inside a transaction whose connection is gone
            raise CatalogUnavailableError(
                f"{self.location}: catalog database connection lost mid-transaction"
            )
        query = _pg_placeholders(sql)
        retry = not self.in_transaction
        try:
            return self._run(query, params, binary)
        except psycopg.Error as exc:
            if not (retry and self.broken) or self._deadline.fired:
                raise self._translate(exc) from None
        self._reconnect_if_broken()  # a read outside a transaction: once more, reconnected
        try:
            return self._run(query, params, binary)
        except psycopg.Error as exc:
            raise self._translate(exc) from None

    def _run(self, query: str, params: Sequence[Any], binary: bool) -> Cursor:
        """One statement; a query (outside a write transaction, under our statement_timeout)
        the server leaves unanswered past the timeout has its connection cut."""
        with self._bounded():
            return self._conn.execute(query, params, binary=binary)

    @contextmanager
    def _bounded(self) -> Iterator[None]:
        self._deadline.fired = False
        if self.in_transaction or not self._own_timeout:
            yield
            return
        self._deadline.arm(self._conn, QUERY_TIMEOUT_S + CLIENT_GRACE_S)
        try:
            yield
        finally:
            self._deadline.disarm()

    def vector_param(self, vector: NDArray[np.float32]) -> PgVector:
        return PgVector(np.ascontiguousarray(vector, dtype=np.float32).reshape(-1))

    def table_exists(self, name: str) -> bool:
        row = self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
        return bool(row[0])

    def begin_write(self, wait_s: float | None = None) -> None:
        self.execute("BEGIN")
        self.in_transaction = True
        try:
            if self._own_timeout:
                self.execute("SET LOCAL statement_timeout = 0")
            if self._own_idle_timeout:
                idle_ms = int(WRITE_IDLE_TIMEOUT_S * 1000)
                self.execute(f"SET LOCAL idle_in_transaction_session_timeout = {idle_ms}")
            self._take_writer_lock(wait_s)
        except BaseException:
            self.rollback()
            raise

    def _take_writer_lock(self, wait_s: float | None) -> None:
        lock = "SELECT pg_advisory_xact_lock(?)"
        if wait_s is None:
            self.execute(lock, (WRITER_LOCK_KEY,))
            return
        self.execute(f"SET LOCAL lock_timeout = {max(1, round(wait_s * 1000))}")
        try:
            self._run(_pg_placeholders(lock), (WRITER_LOCK_KEY,), False)
        except self._psycopg.errors.LockNotAvailable:
            raise writers_busy(self.location, wait_s) from None
        except self._psycopg.Error as exc:
            raise self._translate(exc) from None
        # the write's own statements: as before (the server's or the DSN's setting, not 0)
        self.execute("SET LOCAL lock_timeout TO DEFAULT")

    def commit(self) -> None:
        try:
            self.execute("COMMIT")
        finally:
            self.in_transaction = False

    def rollback(self) -> None:
        self.in_transaction = False
        if self.broken:  # the server rolled it back when the connection dropped
            return
        try:
            self._conn.execute("ROLLBACK")
        except self._psycopg.Error as exc:
            log.warning("%s: rollback failed (%s)", self.location, exc)

    def close(self) -> None:
        self.closed = True
        self._deadline.stop()
        if self._conn is not None:
            self._conn.close()

    def connection(self) -> Any:
        """The psycopg connection (for code that needs psycopg's own API: pgvector search)."""
        self._reconnect_if_broken()
        return self._conn

    @contextmanager
    def translated(self) -> Iterator[None]:
        """psycopg errors raised in the block come out as snapshop errors; outside a write
        transaction the block is a query, bounded as :meth:`execute`'s are."""
        try:
            with self._bounded():
                yield
        except self._psycopg.Error as exc:
            raise self._translate(exc) from None


class _Deadline:
    """Cuts the connection of a statement the server has not answered by a deadline.

    A server-side statement_timeout needs a backend able to enforce it; a stopped one (or a
    frozen host, with TCP still acknowledging) left every request waiting for minutes. Then
    only the client can end the wait: shutting the socket down makes psycopg's blocked read
    fail at once, the connection counts as broken, and the next call reconnects. One thread
    per connection, started at the first statement, waits between deadlines.
    """

    def __init__(self, location: str) -> None:
        self.location = location
        self.fired = False  # the last armed statement was cut
        self._cond = threading.Condition()
        self._armed: tuple[float, Any] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, conn: Any, seconds: float) -> None:
        with self._cond:
            self._armed = (time.monotonic() + seconds, conn)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, daemon=True, name="snapshop-pg-deadline"
                )
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._armed = None
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._armed is None:
                    self._cond.wait()
                    continue
                deadline, conn = self._armed
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._armed = None
                self.fired = True
                log.warning("%s: no answer in %.0f s; closing the connection", self.location,
                            QUERY_TIMEOUT_S + CLIENT_GRACE_S)  # fmt: skip
                _shut_down(conn)


def _shut_down(conn: Any) -> None:
    """Shut the connection's socket down under the thread blocked reading it."""
    try:
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception as exc:  # noqa: BLE001 (a connection already gone: nothing to cut)
        log.debug("shutting the catalog connection down failed: %s", exc)


def connect(
    target: str | os.PathLike[str], readonly: bool = False, alone: bool = False
) -> Database:
    """A :class:`Database` for a SQLite file path or a ``postgresql://`` DSN (``alone``: see
    :class:`SqliteDatabase`)."""
    if is_server_target(target):
        return PostgresDatabase(str(target), readonly=readonly)
    return SqliteDatabase(Path(target), alone=alone)


# --- errors ------------------------------------------------------------------------------
def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _connect_reason(exc: Exception) -> str:
    text = str(exc)
    if "password authentication failed" in text or "authentication failed" in text:
        return "authentication failed (wrong user name or password)"
    if "does not exist" in text and "database" in text:
        match = re.search(r'database "[^"]*" does not exist', text)
        return match.group(0) if match else "database does not exist"
    # libpq: 'connection failed: connection to server at "h" (ip), port p failed: <reason>'
    # then hint lines ("Is the server running on that host...?"): keep the reason
    for line in text.splitlines():
        found = re.search(r".*failed: (.+)$", line.strip())  # after the last "failed: "
        if found:
            return found.group(1).removeprefix("FATAL:").strip()
    return _first_line(exc).removeprefix("FATAL:").strip()


def translate_pg_error(exc: Exception, location: str, lost: bool = False) -> CatalogError:
    """A psycopg error as a snapshop error: a lost connection (or the server going away) is
    :class:`CatalogUnavailableError`; a missing pgvector extension says how to install it;
    anything else (a constraint, bad SQL) is :class:`CatalogError`."""
    import psycopg
    from psycopg import errors as pg

    if isinstance(exc, pg.QueryCanceled):  # statement_timeout: the database is overloaded
        return CatalogUnavailableError(
            f"{location}: catalog database did not answer in time ({_first_line(exc)})"
        )
    if lost or isinstance(exc, (pg.AdminShutdown, pg.CannotConnectNow, pg.ConnectionException)):
        return CatalogUnavailableError(
            f"{location}: catalog database connection lost ({_first_line(exc)})"
        )
    if isinstance(exc, psycopg.OperationalError) and "connection" in str(exc).lower():
        return CatalogUnavailableError(f"{location}: catalog database unreachable: {exc}")
    if isinstance(exc, psycopg.IntegrityError):
        return CatalogError(f"{location}: {_first_line(exc)}")
    return CatalogError(f"{location}: database error: {_first_line(exc)}")


def pgvector_missing(location: str, exc: Exception) -> CatalogError:
    return CatalogError(
        f"{location}: the pgvector extension is not available ({_first_line(exc)}): install "
        "pgvector on the server and run CREATE EXTENSION vector as a superuser in this database"
    )
