"""A write waits for another writer at most ``Catalog.write_wait_s`` (the service: 30 s), then
fails with CatalogBusyError and writes nothing; without a limit (the library's default) it
waits until the other writer ends. Directory catalogs (flock, threads) and server catalogs
(the advisory lock of PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_fixtures import FixedGarmentDetector, build_catalog

from snapshop.catalog.catalog import Catalog, create_catalog, open_catalog
from snapshop.errors import CatalogBusyError, ConfigError

DIM = 8


@contextmanager
def held(catalog: Catalog, *, in_a_write: bool = False, seconds: float = 30.0) -> Iterator[None]:
    """``catalog``'s write lock (or a whole write transaction) held by another thread until
    the block ends, or ``seconds`` have passed."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        if in_a_write:
            with catalog.writing() as write:
                write.upsert_product("holder")
                taken.set()
                release.wait(seconds)
        else:
            with catalog.write_lock():
                taken.set()
                release.wait(seconds)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.join(30)


def titled(catalog: Catalog, title: str) -> None:
    with catalog.writing() as write:
        write.upsert_product("sku", title=title)


@pytest.fixture(params=["directory", pytest.param("postgresql", marks=pytest.mark.server)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "directory":
        target = str(tmp_path / "catalog")
    else:
        target = str(request.getfixturevalue("pg_database"))
    create_catalog(target, model_id="toy@1", model_ref="toy", dim=DIM).close()
    return target


def test_a_write_behind_another_process_writer_fails_busy_after_its_wait(target: str) -> None:
    # Two opens stand for two processes (a directory's flock is per open file; a server's
    # advisory lock per connection).
    with open_catalog(target) as other, open_catalog(target) as mine:
        mine.write_wait_s = 0.3
        with held(other, in_a_write=True):
            start = time.monotonic()
            with pytest.raises(CatalogBusyError, match="more than 0.3 s"):
                titled(mine, "blocked")
            waited = time.monotonic() - start
        assert 0.25 <= waited < 5
        assert mine.find_product("sku") is None  # nothing written
        titled(mine, "later")  # the other writer is done: the same write goes through
        assert mine.find_product("sku").title == "later"


def test_without_a_wait_limit_a_write_waits_for_the_other_writer(target: str) -> None:
    with open_catalog(target) as other, open_catalog(target) as mine:
        assert mine.write_wait_s is None
        done = threading.Event()

        def write() -> None:
            titled(mine, "after")
            done.set()

        with held(other, in_a_write=True):
            writer = threading.Thread(target=write)
            writer.start()
            assert not done.wait(0.6)  # still waiting for the holder
        writer.join(30)
        assert done.is_set() and mine.find_product("sku").title == "after"


def test_threads_of_one_catalog_wait_within_the_limit_too(tmp_path: Path) -> None:
    catalog = create_catalog(tmp_path / "catalog", model_id="toy@1", model_ref="toy", dim=DIM)
    try:
        catalog.write_wait_s = 0.2
        with held(catalog), pytest.raises(CatalogBusyError):
            titled(catalog, "blocked")
        with catalog.write_lock(), catalog.write_lock():  # re-entrant in its own thread
            titled(catalog, "nested")
        assert catalog.find_product("sku").title == "nested"
    finally:
        catalog.close()


def test_a_bounded_wait_leaves_the_writes_own_statements_unbounded(target: str) -> None:
    # PostgreSQL: lock_timeout is set for the advisory lock only, then reset; a write that
    # got the lock runs as before (here: many statements in one transaction).
    with open_catalog(target) as catalog:
        catalog.write_wait_s = 0.05
        with catalog.writing() as write:
            for n in range(50):
                write.upsert_product(f"sku-{n}")
        assert catalog.counts()["products"] == 50


@pytest.mark.parametrize("bad", [-1, float("nan"), "30", True, 1e9])
def test_write_wait_must_be_seconds(tmp_path: Path, bad: object) -> None:
    catalog = create_catalog(tmp_path / "catalog", model_id="toy@1", model_ref="toy", dim=DIM)
    try:
        with pytest.raises(ConfigError, match="write_wait_s"):
            catalog.write_wait_s = bad  # type: ignore[assignment]
    finally:
        catalog.close()


def test_the_service_answers_503_to_an_edit_behind_a_long_writer(tmp_path: Path) -> None:
    from snapshop.service import ServiceSettings, create_app

    directory, _ = build_catalog(tmp_path, n_products=2, images_per_product=1)
    settings = ServiceSettings(directory, api_key="k" * 12, write_wait_s=0.3)
    app = create_app(settings, detector=FixedGarmentDetector())
    with TestClient(app) as client, open_catalog(directory) as ingest_elsewhere:
        product_id = client.get("/v1/products").json()["items"][0]["id"]
        patch = {"json": {"title": "new"}, "headers": {"X-API-Key": "k" * 12}}
        with held(ingest_elsewhere):
            busy = client.patch(f"/v1/products/{product_id}", **patch)
        assert busy.status_code == 503, busy.text
        assert busy.json()["code"] == "catalog_busy" and busy.headers["Retry-After"] == "5"
        assert client.get(f"/v1/products/{product_id}").json()["title"] != "new"
        assert client.patch(f"/v1/products/{product_id}", **patch).status_code == 200
    with pytest.raises(ConfigError, match="write_wait_s"):
        ServiceSettings(directory, write_wait_s=0)


# --- seventh adversarial round (reliability.md) ----------------------------------------------
def test_an_upload_whose_rows_committed_is_not_answered_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ingest commits, lets the lock go, then takes it again to save the index files: a
    # writer that got in between made that save raise CatalogBusyError, and the client was
    # told 503 "nothing was written" for a product that was stored and searchable.
    from test_service_api import noise_jpeg

    from snapshop import ingest
    from snapshop.service import ServiceSettings, create_app

    key = "k" * 12
    directory, _ = build_catalog(tmp_path, n_products=2, images_per_product=1)
    app = create_app(ServiceSettings(directory, api_key=key, write_wait_s=0.3),
                     detector=FixedGarmentDetector())  # fmt: skip
    commit = ingest.Ingestor.commit
    with TestClient(app) as client, open_catalog(directory) as other, ExitStack() as stack:

        def commit_then_another_writer(self: ingest.Ingestor, *args: object) -> object:
            done = commit(self, *args)  # type: ignore[arg-type]
            stack.enter_context(held(other))
            return done

        monkeypatch.setattr(ingest.Ingestor, "commit", commit_then_another_writer)
        image = ("a.jpg", noise_jpeg((90, 90), 3), "image/jpeg")
        upload = {"data": {"sku": "new-sku"}, "headers": {"X-API-Key": key},
                  "files": [("images", image)]}  # fmt: skip
        created = client.post("/v1/products", **upload)
        stack.close()
        monkeypatch.setattr(ingest.Ingestor, "commit", commit)
        assert created.status_code == 201, created.text
        assert created.json()["created"] is True and created.json()["added"] == 1
        assert any("index files were not saved" in w for w in created.json()["warnings"])
        again = client.post("/v1/products", **upload)
        assert again.status_code == 200 and again.json()["skipped"] == 1


def test_a_bounded_write_gets_the_lock_from_a_writer_that_takes_it_again_at_once(
    tmp_path: Path,
) -> None:
    # The wait polled the flock every 20 ms and almost never found the gap while another
    # writer took the lock again at once: 19 of 20 writes failed busy behind holds of 0.1 s
    # ("held the catalog for more than 2 s", which no hold did).
    create_catalog(tmp_path / "catalog", model_id="toy@1", model_ref="toy", dim=DIM).close()
    stop = threading.Event()
    with open_catalog(tmp_path / "catalog") as other, open_catalog(tmp_path / "catalog") as mine:

        def again_and_again() -> None:
            while not stop.is_set():
                with other.write_lock():
                    time.sleep(0.1)

        holder = threading.Thread(target=again_and_again)
        holder.start()
        try:
            mine.write_wait_s = 2.0
            for n in range(8):
                titled(mine, f"title {n}")
        finally:
            stop.set()
            holder.join(30)
        assert mine.find_product("sku").title == "title 7"  # type: ignore[union-attr]


@pytest.mark.server
def test_a_server_catalog_waits_write_wait_s_in_all_not_twice(pg_database: str) -> None:
    # The thread lock and then the advisory lock were each waited for write_wait_s.
    create_catalog(pg_database, model_id="toy@1", model_ref="toy", dim=DIM).close()
    with open_catalog(pg_database) as other, open_catalog(pg_database) as mine:
        mine.write_wait_s = 1.0
        with held(other, in_a_write=True):
            hold_threads = threading.Thread(target=lambda: titled_after(mine, 0.6))
            hold_threads.start()  # this process's thread lock, held 0.6 s of the 1 s
            time.sleep(0.1)
            start = time.monotonic()
            with pytest.raises(CatalogBusyError, match="more than 1 s"):
                titled(mine, "late")
            waited = time.monotonic() - start
            hold_threads.join(30)
        assert 0.8 <= waited < 1.4, waited


def titled_after(catalog: Catalog, seconds: float) -> None:
    with catalog.thread_write_lock():
        time.sleep(seconds)


@pytest.mark.server
def test_a_bounded_write_keeps_the_dsn_lock_timeout(pg_database: str) -> None:
    # After taking the advisory lock, a bounded write set lock_timeout to 0 (no limit), not
    # back to what the DSN (or the server) sets.
    create_catalog(pg_database, model_id="toy@1", model_ref="toy", dim=DIM).close()
    dsn = f"{pg_database}{'&' if '?' in pg_database else '?'}options=-c%20lock_timeout%3D7000"
    with open_catalog(dsn) as catalog:
        catalog.write_wait_s = 5
        with catalog.writing() as write:
            write.upsert_product("a")
            inside = catalog.store._writer_db().execute("SHOW lock_timeout").fetchone()[0]
    assert inside == "7s"


def test_busy_writes_leave_no_thread_or_descriptor_behind(tmp_path: Path) -> None:
    # A thread per bounded wait outlived each wait that gave up, holding a descriptor: 300
    # busy uploads behind a long ingest held 300 threads and descriptors (EMFILE later).
    import os

    create_catalog(tmp_path / "catalog", model_id="toy@1", model_ref="toy", dim=DIM).close()
    with open_catalog(tmp_path / "catalog") as other, open_catalog(tmp_path / "catalog") as mine:
        mine.write_wait_s = 0.005
        with held(other):
            threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
            for _ in range(60):
                with pytest.raises(CatalogBusyError):
                    titled(mine, "never")
            assert threading.active_count() <= threads + 1
            assert len(os.listdir("/proc/self/fd")) <= fds + 1
        mine.write_wait_s = 2.0
        titled(mine, "after")  # the waiting thread hands over the lock the holder let go
        deadline = time.monotonic() + 5
        while threading.active_count() > threads - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name == "snapshop-flock"]


def test_a_waiting_thread_that_cannot_open_the_lock_file_leaves_no_stale_waiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waiting thread died on an error opening the lock file (no descriptor left) and
    # stayed registered: every later bounded wait in the process queued behind a thread that
    # no longer ran, and failed busy though the lock was free.
    from snapshop.catalog import catalog as catalog_module

    create_catalog(tmp_path / "catalog", model_id="toy@1", model_ref="toy", dim=DIM).close()
    opened = catalog_module._open_lock_file

    def no_descriptor_in_the_waiter(path: Path) -> int:
        if threading.current_thread().name == "snapshop-flock":
            raise OSError(24, "Too many open files")
        return opened(path)

    with open_catalog(tmp_path / "catalog") as other, open_catalog(tmp_path / "catalog") as mine:
        mine.write_wait_s = 0.2
        with monkeypatch.context() as patch:
            patch.setattr(catalog_module, "_open_lock_file", no_descriptor_in_the_waiter)
            with held(other), pytest.raises(CatalogBusyError):
                titled(mine, "never")
        mine.write_wait_s = 5.0
        with held(other, seconds=0.3):
            start = time.monotonic()
            titled(mine, "after")  # once the holder lets go, by a new waiting thread
            assert time.monotonic() - start < 3


def test_the_write_waits_benchmark_prints_its_three_measures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from script_helpers import load_script

    benchmark = load_script("benchmarks/write_waits.py")
    args = ["--images", "50", "--writes", "3", "--hold", "0.05", "--wait", "1", "--busy", "20",
            "--seconds", "1", "--dir", str(tmp_path)]  # fmt: skip
    assert benchmark.main(args) == 0
    out = capsys.readouterr().out
    assert "| hand-over: writes that got the lock (holds 0.05 s, wait 1 s) | 3 of 3" in out
    assert "after 20 busy writes |" in out and "opens that rebuilt a sound index" in out
    assert "| 0 of " in out.split("reads beside saves")[1]
    assert not list(tmp_path.iterdir())
