"""A full disk (or a write the system refuses) is a clear error that loses nothing: SQLite's
own rollback is not hidden by a second one, a refused index save says what it could not
write, and a thumbnail that cannot be cached is still served."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_fixtures import small_catalog

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
