"""Defects found by the reliability pass over indexing on Ray and `snapshop catalog migrate`:
each test failed before its fix."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from catalog_helpers import check_catalog_dir
from test_catalog_migrate import build_source

from snapshop import api
from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.catalog.migrate import migrate_catalog
from snapshop.errors import CatalogError, ConfigError
from snapshop.ingest_ray import RayConfig, actor_options

REPO = Path(__file__).resolve().parents[1]


# --- Ray --------------------------------------------------------------------------------------
def test_actors_asking_for_more_than_the_cluster_has_fail_fast() -> None:
    """GPUs per actor on a cluster without GPUs: Ray Data waited for ever ("The job may hang
    forever unless the cluster scales up"); now one clear error before anything runs."""
    with pytest.raises(ConfigError, match=r"0\.5 GPU, more than the Ray cluster has .*0 GPU"):
        actor_options(RayConfig("local", gpus_per_actor=0.5), {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"4 CPU"):
        actor_options(RayConfig("local", cpus_per_actor=4), {"CPU": 2.0})
    fits = actor_options(RayConfig("local", gpus_per_actor=0.5), {"CPU": 2.0, "GPU": 1.0})
    assert fits["num_gpus"] == 0.5 and fits["actors"] == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect(config: str, before: str = "") -> str:
    """What ``ray_connection(RayConfig(<config>))`` prints in a fresh process (after running
    ``before``); fails the test when it has not given up within 60 s."""
    pytest.importorskip("ray")
    script = "\n".join([
        before,
        "from snapshop.errors import ConfigError",
        "from snapshop.ingest_ray import RayConfig, ray_connection",
        "try:",
        f"    with ray_connection(RayConfig({config})):",
        "        print('connected')",
        "except ConfigError as exc:",
        "    print('ConfigError:', exc)",
    ])  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"connecting with RayConfig({config}) did not give up within 60 s")
    return done.stdout + done.stderr[-2000:]


def test_an_unreachable_ray_head_is_a_quick_clear_error() -> None:
    """A ``HOST:PORT`` nobody listens on: ray.init retried for ≈ 14 minutes."""
    out = _connect(f"'127.0.0.1:{_closed_port()}'")
    assert "ConfigError: cannot connect to Ray at 127.0.0.1:" in out


def test_auto_with_a_stale_last_cluster_is_a_quick_clear_error() -> None:
    """``--ray auto`` without $RAY_ADDRESS goes to the last cluster started on this machine,
    which Ray remembers in a file its shutdown may leave behind: a stale one hung ray.init
    (killed after 120 s when tried). The lookup is Ray's own, here given a closed port."""
    stale = f"lambda address, temp_dir: '127.0.0.1:{_closed_port()}'"
    out = _connect("'auto'", before="import ray._private.services as services\n"
                   f"services.get_ray_address_from_environment = {stale}")  # fmt: skip
    assert "ConfigError: cannot connect to Ray at 127.0.0.1:" in out
    assert "the last cluster Ray started here" in out


# --- migrate ----------------------------------------------------------------------------------
def test_migrate_refuses_a_target_that_holds_another_catalog(tmp_path: Path) -> None:
    """Its products were silently merged with the source's (exit 0)."""
    build_source(tmp_path / "src").close()
    with build_source(tmp_path / "other", n_products=2) as other, other.writing() as write:
        write.upsert_product("theirs-only", title="Not in the source")
    with pytest.raises(CatalogError, match=r"holds 1 products .*'theirs-only'.*another catalog"):
        migrate_catalog(tmp_path / "src", tmp_path / "other")
    assert check_catalog_dir(tmp_path / "other")["products"] == 3  # untouched


@pytest.mark.server
def test_migrate_refuses_a_database_that_holds_another_catalog(
    tmp_path: Path, pg_database: str
) -> None:
    build_source(tmp_path / "src", n_products=2).close()
    theirs = create_catalog(pg_database, model_id="m@1", model_ref="m", dim=16)
    with theirs, theirs.writing() as write:
        write.upsert_product("theirs-only")
    with pytest.raises(CatalogError, match="another catalog"):
        migrate_catalog(tmp_path / "src", pg_database)
    with open_catalog(pg_database) as theirs:
        assert theirs.counts()["products"] == 1


def test_an_interrupted_copy_and_an_empty_target_still_get_the_source_detector(
    tmp_path: Path,
) -> None:
    """A target whose card has no detector (a copy killed between creating the target and
    writing its card, or an empty catalog made beforehand) kept none: searches and ingests
    of the copy skipped garment detection although it holds the source's crops."""
    build_source(tmp_path / "src").close()
    create_catalog(tmp_path / "dst", model_id="m@1", model_ref="m", dim=16).close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with open_catalog(tmp_path / "dst") as dst:
        assert dst.detector == "segmenter" and dst.counts()["crops"] == 15


def test_a_source_product_the_target_refuses_is_named_and_the_rerun_continues(
    tmp_path: Path,
) -> None:
    """A product written under older, looser field rules (a NUL in its title, a blank sku):
    the copy stopped with the field's complaint only, no word of which product."""
    build_source(tmp_path / "src").close()
    with sqlite3.connect(tmp_path / "src" / "catalog.sqlite") as db:
        db.execute("UPDATE products SET title = 'a' || char(0) || 'b' WHERE sku = 'sku-3'")
    with pytest.raises(CatalogError, match=r"product 'sku-3' \(id 4\).*U\+0000.*--id 4"):
        migrate_catalog(tmp_path / "src", tmp_path / "dst", page=2)
    assert check_catalog_dir(tmp_path / "dst")["products"] == 2  # the first page is kept
    api.remove_products(tmp_path / "src", ids=[4])
    report = migrate_catalog(tmp_path / "src", tmp_path / "dst", page=2)
    assert report.products == 4 and report.images_present == 4


def test_ray_config_takes_whole_actor_counts_only() -> None:
    """``cpus_per_actor=1.5`` passed and then failed inside every actor (the embedder's
    ``parallel`` is a count); numpy integers are taken as ints."""
    import numpy as np

    for bad in ({"cpus_per_actor": 1.5}, {"cpus_per_actor": True}, {"actors": 0},
                {"actors": 2.0}, {"gpus_per_actor": float("nan")},
                {"max_worker_deaths": -1}):  # fmt: skip
        with pytest.raises(ConfigError):
            RayConfig(**bad)  # type: ignore[arg-type]
    config = RayConfig(cpus_per_actor=np.int64(2), actors=np.int64(3))  # type: ignore[arg-type]
    assert type(config.cpus_per_actor) is int and config.actors == 3
