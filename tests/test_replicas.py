"""Several replicas on one server catalog: a replica's writes wait for the other hosts'
writers without stalling its reads, and a writer frozen mid-transaction does not hold every
other writer up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytestmark = [pytest.mark.server]

DIM = 8


@pytest.fixture
def store_dsn(pg_database: str) -> Iterator[str]:
    """A fresh server catalog store holding one product; yields its DSN."""
    from snapshop.catalog.store import open_store

    store = open_store(pg_database, dim=DIM)
    try:
        with store.transaction() as db:
            product = store.upsert_product(db, "sku-1", title="one")
            store.insert_image(db, product, source="a.jpg", blob=None, sha256="a" * 64,
                               width=4, height=4, vector=np.ones(DIM, np.float32))  # fmt: skip
    finally:
        store.close()
    yield pg_database


def _in_thread(work: object) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = work()  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 (handed to the test)
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_reads_go_on_while_a_write_waits_for_another_hosts_writer(store_dsn: str) -> None:
    """Another host holds the writers' lock: this replica's write waits for it, and its
    reads (every search and /healthz need some) answer meanwhile instead of queueing behind
    the waiting write (they did, so /healthz went 503 for as long as the other write ran)."""
    import psycopg

    from snapshop.catalog.sql import WRITER_LOCK_KEY
    from snapshop.catalog.store import open_store

    store = open_store(store_dsn)
    other_host = psycopg.connect(store_dsn, autocommit=True)
    try:
        other_host.execute("BEGIN")
        other_host.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK_KEY,))

        def write() -> int:
            with store.transaction() as db:
                return store.upsert_product(db, "sku-2", title="two")

        writer, written = _in_thread(write)
        time.sleep(0.5)  # the write is waiting for the lock now
        assert writer.is_alive()
        reader, read = _in_thread(lambda: (store.counts(), store.generation,
                                           store.find_product("sku-1")))  # fmt: skip
        reader.join(10)
        assert not reader.is_alive(), "a read queued behind a write waiting for the lock"
        counts, generation, product = read["result"]  # type: ignore[misc]
        assert counts["products"] == 1 and product is not None and generation == 1
        other_host.execute("COMMIT")
        writer.join(10)
        assert "error" not in written and store.find_product("sku-2") is not None
        assert store.generation == 2
    finally:
        other_host.close()
        store.close()


def test_a_writer_frozen_inside_its_transaction_is_ended_by_the_server(
    store_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica stops mid-write (its host frozen or cut off; TCP alive): the server ends its
    transaction once idle for WRITE_IDLE_TIMEOUT_S, so the other replicas' writes go on
    (they waited for it for as long as the server's TCP keepalive, hours), and the frozen
    one's write is rolled back and fails as unavailable when it wakes."""
    from snapshop.catalog import sql
    from snapshop.catalog.store import open_store
    from snapshop.errors import CatalogUnavailableError

    monkeypatch.setattr(sql, "WRITE_IDLE_TIMEOUT_S", 1.0, raising=False)
    frozen_store, store = open_store(store_dsn), open_store(store_dsn)
    wake = threading.Event()
    try:

        def frozen_write() -> None:
            with frozen_store.transaction() as db:
                frozen_store.upsert_product(db, "frozen", title="never stored")
                wake.wait(30)

        frozen, frozen_out = _in_thread(frozen_write)
        time.sleep(0.3)
        started = time.monotonic()

        def write() -> None:
            with store.transaction() as db:
                store.upsert_product(db, "sku-2", title="two")

        writer, written = _in_thread(write)
        writer.join(15)
        assert not writer.is_alive(), "a frozen writer held every other writer up"
        assert "error" not in written and time.monotonic() - started < 10
        wake.set()
        frozen.join(10)
        assert isinstance(frozen_out.get("error"), CatalogUnavailableError)
        assert store.find_product("frozen") is None and store.find_product("sku-2") is not None
        with frozen_store.transaction() as db:  # the frozen replica writes again, reconnected
            frozen_store.upsert_product(db, "sku-3")
        assert store.counts()["products"] == 3
    finally:
        wake.set()
        frozen_store.close()
        store.close()
