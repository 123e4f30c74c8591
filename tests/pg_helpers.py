"""Fresh PostgreSQL databases on the session's test server (the ``pg_dsn`` fixture)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

_numbers = itertools.count()


def dsn_with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@contextmanager
def fresh_database(server_dsn: str) -> Iterator[str]:
    """Create an empty database, yield its DSN, drop it afterwards (FORCE: a test may have
    left a connection open)."""
    import psycopg

    name = f"snapshop_test_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield dsn_with_database(server_dsn, name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_folder(prefix: str) -> Iterator[Path]:
    """A folder for one ``snapshop db`` server; whatever runs there is stopped afterwards.

    Made with mkdtemp and world-traversable: as root the server runs as another account, and
    pytest's own tmp tree is private to root."""
    from snapshop.dbserver import stop_database
    from snapshop.errors import CatalogError, ConfigError

    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root / "pg"
    finally:
        if (root / "pg" / "data" / "PG_VERSION").exists():
            with contextlib.suppress(CatalogError, ConfigError):
                stop_database(root / "pg")
        shutil.rmtree(root, ignore_errors=True)
