"""pgvector search over a server catalog's own rows: the ``images`` table, or the ``crops`` of
one garment position, of a PostgreSQL catalog store.

Unlike :class:`snapshop.index.pgvector.PgVectorIndex` (a table of copies), this index holds
nothing of its own. The ``vector`` columns the catalog writes in its transactions, with their
HNSW indexes (``vector_ip_ops``, m = 16, ef_construction = 64, created by the store's schema),
ARE the index: a committed image is searchable at once, on every replica, and a rolled-back
one never was. So :meth:`add` and :meth:`remove` do nothing, and there is nothing to save.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.migrations import HNSW_EF_CONSTRUCTION, HNSW_M
from snapshop.catalog.sql import PgVector, PostgresDatabase
from snapshop.errors import CatalogUnavailableError, VectorIndexError
from snapshop.index.base import SearchHits, check_ids, check_query, check_vectors
from snapshop.index.filtering import IdFilter
from snapshop.index.pgvector import filters_inside_search, nearest

if TYPE_CHECKING:
    from snapshop.catalog.store import CatalogStore

log = logging.getLogger(__name__)

TABLES = ("images", "crops")


class CatalogTableIndex:
    """The :class:`~snapshop.index.base.VectorIndex` of a server catalog's ``images`` rows
    (``position=None``) or ``crops`` rows of one ``position``, searched in PostgreSQL.

    ``add`` / ``remove`` do nothing: the rows written in the catalog transaction are the index
    (PostgreSQL maintains their HNSW index in that same transaction). ``search`` orders by
    ``vector <#> q`` (scores are inner products); ``allowed`` becomes ``WHERE id = ANY(...)``
    under pgvector's iterative index scan, so filters apply inside the search. Searches use a
    connection of their own (read-only), so they never wait for the store's writers.
    """

    kind = "pgvector"

    def __init__(
        self,
        store: CatalogStore,
        table: str = "images",
        position: str | None = None,
        ef_search: int = 100,
    ) -> None:
        if store.engine != "postgresql":
            raise VectorIndexError(
                f"{store.location}: a catalog-table index needs a PostgreSQL catalog"
            )
        if table not in TABLES:
            raise VectorIndexError(f"table must be one of {TABLES}, not {table!r}")
        if (table == "crops") != (position is not None):
            raise VectorIndexError("crops need a position; images take none")
        if store.dim is None:
            raise VectorIndexError(f"{store.location}: the catalog records no vector dimension")
        if ef_search < 1:
            raise VectorIndexError("ef_search must be >= 1")
        from psycopg import sql

        self.dim = int(store.dim)
        self.table, self.position, self.ef_search = table, position, ef_search
        self.location = store.location
        self._lock = threading.Lock()
        reader = store.open_reader()
        assert isinstance(reader, PostgresDatabase)
        self._db = reader
        where = "WHERE position = %(position)s" if position is not None else "WHERE true"
        self._where = where
        self._table = sql.Identifier(table)
        self._search_sql = {
            filtered: sql.SQL(
                "SELECT id, -(vector <#> %(q)s::vector) FROM {} " + where + "{}"
                " ORDER BY vector <#> %(q)s::vector LIMIT %(k)s"
            ).format(self._table, sql.SQL(" AND id = ANY(%(allowed)s)" if filtered else ""))
            for filtered in (False, True)
        }
        self.filters_inside = self._run(filters_inside_search)

    def _run(self, work: Any) -> Any:
        """``work(connection)`` translated into snapshop errors; a connection found broken is
        replaced and the (read-only) work tried once more."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._db.translated():
                        return work(self._db.connection())
                except CatalogUnavailableError:
                    if attempt == 2 or not self._db.broken:
                        raise
                    log.warning("%s: search connection lost, reconnecting", self.location)

    @property
    def _params(self) -> dict[str, Any]:
        return {"position": self.position} if self.position is not None else {}

    def __len__(self) -> int:
        from psycopg import sql

        query = sql.SQL("SELECT count(*) FROM {} " + self._where).format(self._table)
        return int(self._run(lambda conn: conn.execute(query, self._params).fetchone()[0]))

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        """Nothing to do: the catalog transaction that wrote these rows indexed them."""
        check_ids(ids, len(check_vectors(vectors, self.dim)))

    def remove(self, ids: NDArray[np.int64]) -> int:
        """Nothing to do (returns 0): deleting the catalog rows removed them from the index."""
        return 0

    def search(
        self, queries: NDArray[np.float32], k: int, allowed: IdFilter | None = None
    ) -> SearchHits:
        """Top-``k`` rows per query by inner product; only ``allowed`` ids when given."""
        queries = check_query(queries, k, self.dim)
        if not self.filters_inside:
            raise VectorIndexError(
                f"{self.location}: searching a catalog table needs pgvector >= 0.8"
                " (iterative index scans)"
            )
        params = self._params
        if allowed is not None:
            params = {**params, "allowed": allowed.ids.tolist()}
        query = self._search_sql[allowed is not None]
        filtered = allowed is not None or self.position is not None
        return self._run(
            lambda conn: nearest(
                conn, query, queries, k, self.ef_search, filtered, params, encode=PgVector
            )
        )

    def ids(self) -> NDArray[np.int64]:
        from psycopg import sql

        query = sql.SQL("SELECT id FROM {} " + self._where).format(self._table)
        rows = self._run(lambda conn: conn.execute(query, self._params).fetchall())
        return np.array([r[0] for r in rows], dtype=np.int64)

    def save(self, path: Path) -> None:
        """Nothing to save: the catalog's rows are the index (no file is written)."""

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "metric": "inner_product",
            "table": self.table,
            "position": self.position,
            "source": "catalog rows",
            "m": HNSW_M,
            "ef_construction": HNSW_EF_CONSTRUCTION,
            "ef_search": self.ef_search,
        }
