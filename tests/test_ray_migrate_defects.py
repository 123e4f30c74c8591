"""Defects found by the reliability pass over indexing on Ray and `snapshop catalog migrate`:
each test failed before its fix."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from catalog_helpers import check_catalog_dir, make_images
from PIL import Image
from test_catalog_migrate import build_source
from test_ingest_ray import ray_local  # noqa: F401  (the session's local Ray)

from snapshop import api
from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.catalog.migrate import migrate_catalog
from snapshop.errors import CatalogError, ConfigError, IngestError
from snapshop.ingest_ray import TASK_RETRIES, RayConfig, actor_options

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


POISON = (255, 0, 255)


class PoisonDetector:
    """Kills its worker process on a magenta image, as a native crash or the OOM killer would."""

    name = "poison"

    def detect(self, image: Any) -> list[Any]:
        import os

        w, h = image.size
        pixel = image.convert("RGB").getpixel((w // 2, h // 2))
        if all(abs(a - b) < 20 for a, b in zip(pixel, POISON, strict=True)):
            os._exit(1)
        return []


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_an_image_that_kills_every_actor_fails_the_ingest_instead_of_hanging(
    tmp_path: Path, lite0_model_dir: Path
) -> None:
    """Ray Data retried the batch on a fresh actor for ever."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # PoisonDetector
    make_images(tmp_path / "shop", n_products=2, per_product=2, size=48)
    poison = next((tmp_path / "shop").iterdir()) / "poison.png"
    Image.new("RGB", (64, 64), POISON).save(poison)
    outcome: dict[str, Any] = {}

    def ingest() -> None:
        try:
            outcome["report"] = api.index_source(
                tmp_path / "shop", tmp_path / "cat", model=str(lite0_model_dir),
                detector=PoisonDetector(), ray=RayConfig(),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=ingest, daemon=True)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive(), "the ingest hung on an image that kills its actor"
    error = outcome.get("error")
    assert isinstance(error, IngestError), outcome
    assert f"died {TASK_RETRIES + 1} times on one batch" in str(error)
    assert "run the ingest again" in str(error)


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
                {"actors": 2.0}, {"gpus_per_actor": float("nan")}):  # fmt: skip
        with pytest.raises(ConfigError):
            RayConfig(**bad)  # type: ignore[arg-type]
    config = RayConfig(cpus_per_actor=np.int64(2), actors=np.int64(3))  # type: ignore[arg-type]
    assert type(config.cpus_per_actor) is int and config.actors == 3
