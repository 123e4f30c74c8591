"""A server catalog end to end: indexed into PostgreSQL, served by two `snapshop serve`
replicas that see each other's writes, and a database that goes away answered with 503."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from service_fixtures import API_KEY, free_port, live_serve

pytestmark = [pytest.mark.server, pytest.mark.slow]

AUTH = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def indexed(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list]]:
    """A demo shop indexed into a fresh database; yields (URI, held-out queries)."""
    from pg_helpers import fresh_database

    from snapshop import api
    from snapshop.demo import generate_demo_catalog

    root = tmp_path_factory.mktemp("server-shop")
    manifest, queries = generate_demo_catalog(root / "source", n_products=6, images_per_product=1)
    with fresh_database(pg_dsn) as uri:
        report = api.index_source(
            manifest, uri, model="efficientnet_lite0", detector="none", workers=0
        )
        assert report.added == 6
        yield uri, queries


def test_index_stores_thumbnails_and_vectors_in_the_database(indexed) -> None:
    from snapshop.catalog.catalog import open_catalog
    from snapshop.errors import CatalogError

    uri, _ = indexed
    with open_catalog(uri) as catalog:
        assert catalog.is_server and catalog.counts()["images"] == 6
        for product in catalog.list_products():
            for image in catalog.images_of(product.id):
                data, media = catalog.stored_thumbnail(image)
                thumb = Image.open(io.BytesIO(data))
                assert media == "image/jpeg" and thumb.format == "JPEG"
                assert max(thumb.size) <= 320 and image.blob is None
        with pytest.raises(CatalogError, match="keeps no files"):
            _ = catalog.directory


def test_two_replicas_see_each_others_writes(indexed, tmp_path: Path) -> None:
    import httpx

    uri, queries = indexed
    photo, _ = queries[0]
    data = Path(photo).read_bytes()
    with live_serve(uri, tmp_path / "a.log") as a, live_serve(uri, tmp_path / "b.log") as b:
        assert httpx.get(f"{b}/healthz").json()["products"] == 6
        added = httpx.post(
            f"{a}/v1/products", headers=AUTH, data={"sku": "new-on-a", "title": "added on A"},
            files=[("images", ("p.jpg", data, "image/jpeg"))], timeout=60,
        )  # fmt: skip
        assert added.status_code == 201, added.text
        posted = time.monotonic()
        while True:  # the other replica finds it by search
            found = httpx.post(f"{b}/v1/search", files={"image": ("q.jpg", data, "image/jpeg")},
                               data={"k": "3"}, timeout=60).json()  # fmt: skip
            top = found["image_results"][0]
            if top["sku"] == "new-on-a":
                break
            assert time.monotonic() - posted < 1.0, "replica B did not see A's product in 1 s"
        seen_after = time.monotonic() - posted
        thumb = httpx.get(f"{b}/v1/images/{top['image_id']}/thumb", params={"size": 64})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 64
        product_id = top["product_id"]
        assert httpx.delete(f"{b}/v1/products/{product_id}", headers=AUTH).status_code == 200
        again = httpx.post(f"{a}/v1/search", files={"image": ("q.jpg", data, "image/jpeg")},
                           data={"k": "3"}, timeout=60).json()  # fmt: skip
        assert all(h["sku"] != "new-on-a" for h in again["image_results"])
    assert seen_after < 1.0


def test_health_answers_503_while_the_database_is_unreachable(indexed, pg_dsn: str) -> None:
    """Connections dropped by the server: the next request reconnects. Connections refused:
    503 catalog_unavailable (no hang, no traceback), and 200 again once the database is back."""
    import psycopg
    from fastapi.testclient import TestClient

    from snapshop.service.app import create_app
    from snapshop.service.settings import ServiceSettings

    uri, _ = indexed
    name = urlsplit(uri).path.lstrip("/")
    settings = ServiceSettings(catalog_dir=uri, model="efficientnet_lite0", detector="none")
    kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
    with (
        TestClient(create_app(settings)) as client,
        psycopg.connect(pg_dsn, autocommit=True) as admin,
    ):
        assert client.get("/healthz").status_code == 200
        admin.execute(kill, (name,))
        assert client.get("/healthz").status_code == 200  # reconnected
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute(kill, (name,))
            started = time.monotonic()
            down = client.get("/healthz")
            assert down.status_code == 503 and down.json()["code"] == "catalog_unavailable"
            assert down.headers["retry-after"] == "1"
            assert time.monotonic() - started < 15
            assert client.get("/v1/products").status_code == 503
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert client.get("/healthz").status_code == 200


def test_unreachable_database_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    uri = f"postgresql://shop:s3cret-pw@127.0.0.1:{free_port()}/catalog"
    done = subprocess.run(
        [sys.executable, "-c", "from snapshop.cli import app; app()", "catalog", "info",
         "--catalog", uri], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "Traceback" not in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout


def _index_command(manifest: Path, uri: str) -> list[str]:
    return [sys.executable, "-c", "from snapshop.cli import app; app()", "index", str(manifest),
            "--catalog", uri, "--model", "efficientnet_lite0", "--detector", "none",
            "--workers", "0", "--batch-size", "4"]  # fmt: skip


def test_the_same_source_indexed_twice_at_once_makes_no_duplicates(
    pg_database: str, tmp_path: Path
) -> None:
    """Two processes index one source into one new server catalog at the same time: the
    catalog is created once, and every image is in it exactly once."""
    from snapshop.catalog.catalog import open_catalog
    from snapshop.demo import generate_demo_catalog

    manifest, _ = generate_demo_catalog(tmp_path / "src", n_products=5, images_per_product=2)
    procs = [subprocess.Popen(_index_command(manifest, pg_database), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with open_catalog(pg_database) as catalog:
        assert catalog.counts()["products"] == 5 and catalog.counts()["images"] == 10
        shas = [i.sha256 for p in catalog.list_products() for i in catalog.images_of(p.id)]
        assert len(shas) == len(set(shas)) == 10


def _cut_connections(pg_dsn: str, database: str) -> None:
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE datname = %s", (database,))  # fmt: skip


INGEST = {"model": "efficientnet_lite0", "detector": "none", "workers": 0, "batch_size": 4}


def test_connections_dropped_between_batches_are_reopened(
    pg_database: str, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshop import api
    from snapshop.demo import generate_demo_catalog
    from snapshop.ingest import Ingestor

    manifest, _ = generate_demo_catalog(tmp_path / "src", n_products=6, images_per_product=2)
    real_commit, commits = Ingestor.commit, {"n": 0}

    def commit(self, batch, report):  # type: ignore[no-untyped-def]
        commits["n"] += 1
        if commits["n"] == 2:
            _cut_connections(pg_dsn, urlsplit(pg_database).path.lstrip("/"))
        return real_commit(self, batch, report)

    monkeypatch.setattr(Ingestor, "commit", commit)
    report = api.index_source(manifest, pg_database, **INGEST)
    assert commits["n"] == 3 and report.added == 12 and not report.failed


def test_a_connection_lost_inside_a_write_rolls_the_batch_back_and_the_rerun_completes(
    pg_database: str, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database drops every connection while a batch's transaction is open: the ingest
    stops with CatalogUnavailableError, the batches before it are intact, nothing of the cut
    batch is there, and a rerun ends with each image exactly once."""
    from snapshop import api
    from snapshop.catalog.catalog import open_catalog
    from snapshop.catalog.write import CatalogWrite
    from snapshop.demo import generate_demo_catalog
    from snapshop.errors import CatalogUnavailableError

    manifest, _ = generate_demo_catalog(tmp_path / "src", n_products=6, images_per_product=2)
    real_insert, inserts = CatalogWrite.insert_image, {"n": 0}

    def insert(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        inserts["n"] += 1
        if inserts["n"] == 6:  # the second image of the second batch of 4
            _cut_connections(pg_dsn, urlsplit(pg_database).path.lstrip("/"))
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(CatalogWrite, "insert_image", insert)
    with pytest.raises(CatalogUnavailableError):
        api.index_source(manifest, pg_database, **INGEST)
    with open_catalog(pg_database) as catalog:
        assert catalog.counts()["images"] == 4  # the first batch, whole; the second rolled back
        ids = [i.id for p in catalog.list_products() for i in catalog.images_of(p.id)]
        stored = np.concatenate([v for _, v in catalog.store.iter_vectors("images", catalog.dim)])
        assert len(stored) == len(ids) == 4
    monkeypatch.setattr(CatalogWrite, "insert_image", real_insert)
    report = api.index_source(manifest, pg_database, **INGEST)
    assert report.added == 8 and report.skipped == 4
    with open_catalog(pg_database) as catalog:
        assert catalog.counts() == {"products": 6, "images": 12, "crops": 0}


def test_a_server_catalog_verifies_against_its_stored_thumbnails(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A server catalog keeps no image files: spatial verification extracts each candidate's
    features from its stored 320 px thumbnail, and still puts the photographed carton first."""
    from catalog_helpers import write_csv
    from pg_helpers import fresh_database
    from verify_helpers import package, photographed

    from snapshop import api
    from snapshop.search import Searcher
    from snapshop.verify import VerifyConfig

    rows: list[list[object]] = []
    for seed in (21, 22, 23, 24):
        path = tmp_path / f"p{seed}.jpg"
        package(seed, size=(450, 600)).save(path, quality=92)  # stored as a 240 x 320 thumbnail
        rows.append([f"p{seed}", path, f"carton {seed}", "", 1.0, "dairy"])
    query = tmp_path / "photo.jpg"
    photographed(package(23, size=(450, 600))).save(query, quality=92)
    with fresh_database(pg_dsn) as uri:
        api.index_source(
            write_csv(tmp_path / "shop.csv", rows), uri, model="efficientnet_lite0",
            detector="none", workers=0,
        )  # fmt: skip
        searcher = api.open_searcher(uri)
        with searcher.catalog:
            config = VerifyConfig(top_k=4, min_inliers=20, weight=1.0)
            checked = Searcher(searcher.catalog, searcher.embedder, verify=config)
            result = checked.search(query, k=4, detect=False)
            plain = {h.sku: h.score for h in searcher.search(query, k=4).image_results}
        assert result.image_results[0].sku == "p23"
        assert result.image_results[0].score == pytest.approx(plain["p23"] + 1.0, abs=1e-5)
