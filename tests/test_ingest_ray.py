"""Indexing on Ray Data (issue #14 item 5): same vectors as in-process, idempotent, resumable
after the driver is killed, and a local Ray that ends with its driver."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import check_catalog_dir, db_rows, make_images, shop_csv, write_csv
from PIL import Image
from test_ingest_lifetime import session_members
from typer.testing import CliRunner

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.cli import app
from snapshop.data.sources import read_source
from snapshop.errors import ConfigError, IngestError
from snapshop.ingest import Ingestor
from snapshop.ingest_ray import RayConfig, actor_options, import_ray, ingest_on_ray
from snapshop.models.embedder import Embedder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local(snapshop_home: Path) -> Iterator[Any]:
    """One local Ray for the session (2 CPUs): ``index_source(ray=...)`` uses it as it is."""
    ray = pytest.importorskip("ray")
    for attempt in range(2):
        try:
            ray.init(
                address="local", num_cpus=2, include_dashboard=False,
                object_store_memory=100 << 20, logging_level=logging.WARNING, log_to_driver=False,
            )  # fmt: skip
            break
        except Exception:  # once in CI: the raylet did not register within Ray's fixed 30 s
            ray.shutdown()
            if attempt:
                raise
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def image_vectors(catalog_dir: Path) -> dict[tuple[str, str], tuple[np.ndarray, int, int]]:
    rows = db_rows(
        catalog_dir,
        "SELECT p.sku, i.sha256, i.vector, i.width, i.height FROM images i"
        " JOIN products p ON p.id = i.product_id",
    )
    return {(s, h): (np.frombuffer(v, np.float32), w, hh) for s, h, v, w, hh in rows}


def crop_vectors(catalog_dir: Path) -> dict[tuple[str, str, str], tuple[np.ndarray, tuple]]:
    rows = db_rows(
        catalog_dir,
        "SELECT p.sku, i.sha256, c.position, c.vector, c.x1, c.y1, c.x2, c.y2 FROM crops c"
        " JOIN images i ON i.id = c.image_id JOIN products p ON p.id = i.product_id",
    )
    return {(s, h, pos): (np.frombuffer(v, np.float32), box) for s, h, pos, v, *box in rows}


def assert_same_catalogs(a: Path, b: Path) -> None:
    """Same images and crops (by product, sha256, position), vectors within 1e-5."""
    images_a, images_b = image_vectors(a), image_vectors(b)
    assert images_a.keys() == images_b.keys() and images_a
    for key, (vec, w, h) in images_a.items():
        assert np.max(np.abs(vec - images_b[key][0])) <= 1e-5
        assert (w, h) == images_b[key][1:]
    crops_a, crops_b = crop_vectors(a), crop_vectors(b)
    assert crops_a.keys() == crops_b.keys()
    for key, (vec, box) in crops_a.items():
        assert np.max(np.abs(vec - crops_b[key][0])) <= 1e-5
        np.testing.assert_allclose(box, crops_b[key][1], atol=1e-4)
    assert check_catalog_dir(a) == check_catalog_dir(b)


# --- without Ray ------------------------------------------------------------------------------
def test_actor_options_carry_cpus_gpus_and_pool_size() -> None:
    gpu = actor_options(
        RayConfig("auto", cpus_per_actor=2, gpus_per_actor=0.5), {"CPU": 16.0, "GPU": 2.0}
    )
    assert gpu == {"actors": 4, "num_cpus": 2, "num_gpus": 0.5}  # 2 GPUs / 0.5 each
    cpu = actor_options(RayConfig("auto"), {"CPU": 6.0})
    assert cpu == {"actors": 6, "num_cpus": 1}
    assert actor_options(RayConfig("auto", actors=3), {"CPU": 6.0})["actors"] == 3
    with pytest.raises(ConfigError):
        RayConfig("auto", cpus_per_actor=0)


def test_cli_ray_options_reach_the_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_index_source(*args: Any, **kwargs: Any) -> api.IngestReport:
        seen.update(kwargs)
        return api.IngestReport()

    monkeypatch.setattr(api, "index_source", fake_index_source)
    args = ["index", str(tmp_path), "--catalog", str(tmp_path / "cat"), "--ray", "ray://head:10001"]
    result = CliRunner().invoke(app, [*args, "--ray-gpus", "0.5", "--ray-actors", "3"])
    assert result.exit_code == 0, result.output
    assert seen["ray"] == RayConfig("ray://head:10001", actors=3, gpus_per_actor=0.5)
    result = CliRunner().invoke(app, [*args, "--ray-max-worker-deaths", "60"])
    assert result.exit_code == 0, result.output
    assert seen["ray"] == RayConfig("ray://head:10001", max_worker_deaths=60)
    CliRunner().invoke(app, args[:4])
    assert seen["ray"] is None  # without --ray: the in-process ingest


def test_missing_ray_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'snapshop\[ray\]'"):
        import_ray()
    make_images(tmp_path / "shop", n_products=1, per_product=1, size=32)
    result = CliRunner().invoke(
        app, ["index", str(tmp_path / "shop"), "--catalog", str(tmp_path / "cat"), "--ray", "local"]
    )
    assert result.exit_code == 2 and "snapshop[ray]" in result.output
    assert not (tmp_path / "cat").exists()  # nothing written


# --- on a local Ray ---------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_vectors_and_crops_match_in_process(
    tmp_path: Path, lite0_model_dir: Path, ray_local: Any
) -> None:
    images = make_images(tmp_path / "shop", n_products=3, per_product=3, size=64)
    manifest = shop_csv(tmp_path / "shop.csv", images)  # categories: garments get crops
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    sku = next(iter(images))
    with open(manifest, "a") as fh:  # a file that cannot be decoded, and one listed twice
        fh.write(f"{sku},{broken},,,,\n{sku},{images[sku][0]},,,,\n")
    reports = {}
    for name, ray in (("local", None), ("ray", RayConfig())):
        reports[name] = api.index_source(
            manifest, tmp_path / name, model=str(lite0_model_dir), detector="segmenter",
            batch_size=4, workers=0, ray=ray,
        )  # fmt: skip
    local, on_ray = reports["local"], reports["ray"]
    assert (on_ray.added, on_ray.skipped, on_ray.crops) == (local.added, local.skipped, local.crops)
    assert on_ray.added == 9 and on_ray.skipped == 1 and on_ray.crops > 0
    assert on_ray.failed == local.failed == [(str(broken), local.failed[0][1])]
    assert_same_catalogs(tmp_path / "local", tmp_path / "ray")
    for (blob,) in db_rows(tmp_path / "ray", "SELECT blob FROM images"):
        assert (tmp_path / "ray" / blob).is_file()
    titles = dict(db_rows(tmp_path / "ray", "SELECT sku, title FROM products"))
    assert titles == dict(db_rows(tmp_path / "local", "SELECT sku, title FROM products"))


@pytest.mark.ray
def test_ray_rerun_sends_nothing_known_and_updates_metadata(
    tmp_path: Path, lite0_model_dir: Path, ray_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = make_images(tmp_path / "shop", n_products=3, per_product=2, size=48)
    manifest = shop_csv(tmp_path / "shop.csv", images)
    first = api.index_source(
        manifest, tmp_path / "cat", model=str(lite0_model_dir), ray=RayConfig()
    )
    assert first.added == 6
    sent: list[int] = []
    from_items = ray_local.data.from_items
    monkeypatch.setattr(
        ray_local.data,
        "from_items",
        lambda rows, **kw: sent.append(len(rows)) or from_items(rows, **kw),
    )
    rows = [
        [sku, path, f"renamed {sku}", "", "", ""] for sku, paths in images.items() for path in paths
    ]
    new_image = tmp_path / "new.jpg"
    shutil.copy(images[rows[0][0]][0], new_image)  # the same bytes again: known
    write_csv(tmp_path / "edited.csv", [*rows, [rows[0][0], new_image, "", "", "", ""]])
    result = CliRunner().invoke(
        app,
        [
            "index",
            str(tmp_path / "edited.csv"),
            "--catalog",
            str(tmp_path / "cat"),
            "--ray",
            "local",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"added": 0' in result.output and '"skipped": 7' in result.output
    assert sent == []  # every image was known before anything went out
    titles = {t for (t,) in db_rows(tmp_path / "cat", "SELECT title FROM products")}
    assert titles == {f"renamed {sku}" for sku in images}
    assert check_catalog_dir(tmp_path / "cat") == {"products": 3, "images": 6, "crops": 0}


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from snapshop import api
    from snapshop.ingest_ray import RayConfig

    source, catalog_dir, model = sys.argv[1:4]
    # Slow enough per batch that the kill lands between commits.
    api.index_source(source, catalog_dir, model=model, batch_size=4,
                     ray=RayConfig("local", cpus=2, object_store_mb=100),
                     progress=lambda n: time.sleep(0.4))
    """
)


@pytest.mark.ray
def test_kill_9_of_the_driver_ends_local_ray_and_the_rerun_completes(
    tmp_path: Path, lite0_model_dir: Path, ray_local: Any
) -> None:
    make_images(tmp_path / "shop", n_products=6, per_product=4, size=48)
    total, cat = 24, tmp_path / "cat"
    script = tmp_path / "ingest_job.py"
    script.write_text(KILLABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "shop"), str(cat), str(lite0_model_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip

    def stored() -> int:
        try:
            return len(db_rows(cat, "SELECT id FROM images"))
        except sqlite3.Error:
            return 0

    try:
        deadline = time.monotonic() + 120
        while stored() < 8:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the ingest made no progress"
            time.sleep(0.05)
        ray_processes = session_members(proc.pid) - {proc.pid}
        proc.send_signal(signal.SIGKILL)  # the driver alone, as an operator's kill -9 does
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (alive := session_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"Ray processes outlived their driver: {sorted(alive)}"
        assert len(ray_processes) >= 3  # the kill landed while local Ray ran
    finally:
        for pid in session_members(proc.pid):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    done = stored()
    assert 8 <= done < total, "the kill did not land mid-ingest"

    report = api.index_source(tmp_path / "shop", cat, ray=RayConfig())  # on the session's Ray
    assert report.added == total - done and report.skipped == done
    api.index_source(tmp_path / "shop", tmp_path / "clean", model=str(lite0_model_dir), workers=0)
    assert_same_catalogs(cat, tmp_path / "clean")
    assert check_catalog_dir(cat) == {"products": 6, "images": total, "crops": 0}


class SlowDetector:
    """Finds nothing, slowly: keeps the actors busy while a test kills one of them."""

    name = "slow"

    def detect(self, image: Any) -> list[Any]:
        time.sleep(0.15)
        return []


def actor_pids() -> set[int]:
    """Live pool actors of this session's Ray (their process title names the mapper)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"IndexActor" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.ray
def test_a_killed_actor_is_replaced_and_nothing_is_lost(
    tmp_path: Path, lite0_model_dir: Path, ray_local: Any
) -> None:
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # SlowDetector
    make_images(tmp_path / "shop", n_products=4, per_product=6, size=48)
    killed: list[int] = []

    def kill_one_actor(n: int) -> None:
        if not killed and (pids := actor_pids()):
            killed.append(min(pids))
            os.kill(killed[0], signal.SIGKILL)

    report = api.index_source(
        tmp_path / "shop", tmp_path / "cat", model=str(lite0_model_dir), detector=SlowDetector(),
        batch_size=4, ray=RayConfig(), progress=kill_one_actor,
    )  # fmt: skip
    assert killed and killed[0] not in actor_pids()
    assert report.added == 24 and not report.failed
    assert check_catalog_dir(tmp_path / "cat") == {"products": 4, "images": 24, "crops": 0}


@pytest.mark.ray
@pytest.mark.server
def test_ray_into_a_server_catalog_stores_thumbnails_and_the_same_vectors(
    tmp_path: Path, lite0_model_dir: Path, ray_local: Any, pg_database: str
) -> None:
    make_images(tmp_path / "shop", n_products=2, per_product=3, size=400)
    ray_report = api.index_source(
        tmp_path / "shop", pg_database, model=str(lite0_model_dir), ray=RayConfig()
    )
    local = api.index_source(tmp_path / "shop", tmp_path / "cat", model=str(lite0_model_dir))
    assert ray_report.added == local.added == 6
    expected = image_vectors(tmp_path / "cat")
    with open_catalog(pg_database) as catalog:
        assert catalog.is_server and catalog.counts()["images"] == 6
        stored = {}
        for ids, vecs in catalog.store.iter_vectors("images", catalog.dim):
            stored.update(zip(ids.tolist(), vecs, strict=True))
        for product in catalog.list_products():
            for image in catalog.images_of(product.id):
                data, media = catalog.stored_thumbnail(image)
                assert media == "image/jpeg" and max(Image.open(io.BytesIO(data)).size) <= 320
                assert image.blob is None
                want = expected[(product.sku, image.sha256)][0]
                assert np.max(np.abs(stored[image.id] - want)) <= 1e-5


@pytest.mark.ray
def test_an_actor_that_cannot_start_is_one_clear_error(
    tmp_path: Path, lite0_model_dir: Path, ray_local: Any
) -> None:
    make_images(tmp_path / "shop", n_products=1, per_product=2, size=32)
    embedder = Embedder(lite0_model_dir)
    catalog = api.open_or_create_catalog(tmp_path / "cat", embedder, str(lite0_model_dir))
    records = read_source(tmp_path / "shop")
    with catalog, pytest.raises(IngestError, match=r"ModelError: .*nowhere: no model\.json"):
        ingest_on_ray(
            Ingestor(catalog, embedder), records, RayConfig(), model_dir=str(tmp_path / "nowhere")
        )
    assert check_catalog_dir(tmp_path / "cat")["images"] == 0
