"""A full disk (or a write the system refuses) is a clear error that loses nothing: SQLite's
own rollback is not hidden by a second one, a refused index save says what it could not
write, and a thumbnail that cannot be cached is still served."""

from __future__ import annotations

import errno
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_fixtures import API_KEY, small_catalog

from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.errors import CatalogError
from snapshop.service import ServiceSettings, create_app

DIM = 8


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_a_full_database_is_a_clear_error_and_the_catalog_stays_whole(tmp_path: Path) -> None:
    catalog = create_catalog(tmp_path / "c", model_id="m@1", model_ref="m", dim=DIM)
    with catalog.writing() as write:
        pid = write.upsert_product("kept")
        write.insert_image(pid, source="a.jpg", blob=None, sha256="a" * 64, width=4, height=4,
                           vector=_unit(0))  # fmt: skip
    db = catalog.store._db._db  # SQLite stops at this many pages: "database or disk is full"
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")
    full = "the disk is full; nothing of this write was stored"
    with pytest.raises(CatalogError, match=full), catalog.writing() as write:
        for n in range(200):
            write.upsert_product(f"p{n}", title="x" * 200)
    db.execute("PRAGMA max_page_count=1073741823")
    catalog.close()
    with open_catalog(tmp_path / "c") as reopened:
        assert [p.sku for p in reopened.list_products(limit=10)] == ["kept"]
        assert len(reopened.index()) == 1


def test_an_index_save_the_system_refuses_names_the_file(tmp_path: Path) -> None:
    """Files over RLIMIT_FSIZE are refused (EFBIG), as a full disk refuses them."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from snapshop.index.flat import FlatIndex
        index = FlatIndex(64)
        vectors = np.ones((2000, 64), dtype=np.float32) / 8
        index.add(np.arange(2000, dtype=np.int64), vectors)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            index.save(__import__("pathlib").Path({str(tmp_path / "images.faiss")!r}))
        except OSError as exc:
            print("OSError:", exc)
            sys.exit(0)
        sys.exit(1)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"cannot write {tmp_path / 'images.faiss'}" in out.stdout
    assert not (tmp_path / "images.faiss").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp file left


def test_a_thumbnail_that_cannot_be_cached_is_still_served(tmp_path: Path) -> None:
    catalog = small_catalog(tmp_path)
    (catalog / "thumbs").write_bytes(b"in the way")  # the cache folder cannot be made
    with TestClient(create_app(ServiceSettings(catalog))) as client:
        response = client.get("/v1/images/1/thumb?size=128")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert response.content[:2] == b"\xff\xd8"


@pytest.mark.parametrize("kind", ["hnsw_sq", "ivfpq"])
def test_a_save_interrupted_between_its_two_renames_is_refused_on_load(tmp_path, kind):
    """The vectors file is renamed first: a crash before the main file follows leaves a
    main file of the previous save beside vectors of the next, of the same shape."""
    from snapshop.index.factory import create_index
    from snapshop.index.reranked import RerankedIndex

    rng = np.random.default_rng(0)
    params = {"nlist": 4, "pq_m": 4} if kind == "ivfpq" else {}
    saves = []
    for n in range(2):
        index = create_index(kind, 16, **params)
        vectors = rng.standard_normal((300, 16)).astype(np.float32)
        index.add(
            np.arange(300, dtype=np.int64), vectors / np.linalg.norm(vectors, axis=1)[:, None]
        )
        index.save(tmp_path / f"{n}.idx")
        saves.append(tmp_path / f"{n}.idx")
    RerankedIndex.vectors_path(saves[1]).replace(RerankedIndex.vectors_path(saves[0]))
    with pytest.raises(RuntimeError, match="do not match"):
        RerankedIndex.load(saves[0])


def _refuse_index_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("snapshop.catalog.catalog.save_index", full)


def test_a_committed_write_whose_index_save_is_refused_succeeds_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows committed, so the upload and the delete succeeded: a 200 / 201 that says the
    index files were not saved, not a 500 inviting a retry; the next open is up to date."""
    catalog = small_catalog(tmp_path, n_products=3)
    auth = {"X-API-Key": API_KEY}
    buf = io.BytesIO()
    Image.effect_noise((90, 120), 60).convert("RGB").save(buf, "JPEG")
    with TestClient(create_app(ServiceSettings(catalog, api_key=API_KEY))) as client:
        _refuse_index_saves(monkeypatch)
        photo = [("images", ("a.jpg", buf.getvalue(), "image/jpeg"))]
        added = client.post("/v1/products", data={"sku": "late"}, headers=auth, files=photo)
        assert added.status_code == 201, added.text
        assert added.json()["added"] == 1
        assert "No space left on device" in added.json()["warnings"][0]
        found = client.post("/v1/search", data={"k": "1"},
                            files={"image": ("q.jpg", buf.getvalue(), "image/jpeg")})  # fmt: skip
        assert found.json()["image_results"][0]["sku"] == "late"  # the memory index has it
        first = client.get("/v1/products", params={"limit": 1}).json()["items"][0]
        deleted = client.delete(f"/v1/products/{first['id']}", headers=auth)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["images_removed"] == 1 and deleted.json()["warnings"]
        monkeypatch.undo()
    with open_catalog(catalog) as reopened:  # the files were stale; the open reconciled them
        skus = {p.sku for p in reopened.list_products(limit=10)}
        assert "late" in skus and first["sku"] not in skus
        assert len(reopened.index()) == len(skus)
        reopened.save_indexes()
        assert reopened.unsaved_indexes is None


def test_an_ingest_reports_index_files_it_could_not_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshop import api
    from snapshop.demo import generate_demo_catalog

    manifest, _ = generate_demo_catalog(tmp_path / "source", n_products=2, images_per_product=1)
    _refuse_index_saves(monkeypatch)
    report = api.index_source(manifest, tmp_path / "c", model="efficientnet_lite0",
                              detector="none", workers=0)  # fmt: skip
    assert report.added == 2 and len(report.warnings) == 1
    assert "No space left on device" in report.to_dict()["warnings"][0]
    monkeypatch.undo()
    with open_catalog(tmp_path / "c") as reopened:
        assert len(reopened.index()) == 2
        with reopened.writing() as write:
            write.delete_product(reopened.list_products(limit=1)[0].id)
        assert reopened.save_after_commit() is None


def test_gc_frees_space_on_a_disk_too_full_to_open_the_catalog(tmp_path: Path) -> None:
    """A database opened the shared way needs a 32 KiB ``-shm`` file, which a full disk (here
    a file-size limit) refuses; gc, the command that frees space, opens it alone instead."""
    root = tmp_path / "c"
    catalog = create_catalog(root, model_id="m@1", model_ref="m", dim=DIM)
    with catalog.writing() as write:
        pid = write.upsert_product("kept")
        write.insert_image(pid, source="a.jpg", blob=None, sha256="a" * 64, width=4, height=4,
                           vector=_unit(0))  # fmt: skip
    catalog.close()
    orphan = root / "blobs" / "ab" / ("ab" + "0" * 62 + ".jpg")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 1000)
    script = textwrap.dedent(f"""
        import resource, signal
        from snapshop import api
        from snapshop.catalog.catalog import open_catalog
        from snapshop.errors import CatalogStorageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
        try:
            open_catalog({str(root)!r})
        except CatalogStorageError as exc:
            print("refused:", exc)
        print("freed:", api.collect_garbage({str(root)!r}, grace_seconds=0).bytes_freed)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "refused:" in out.stdout and "disk" in out.stdout
    assert "freed: 1000" in out.stdout and not orphan.exists()
    with open_catalog(root) as reopened:  # nothing else changed
        assert [p.sku for p in reopened.list_products(limit=10)] == ["kept"]
