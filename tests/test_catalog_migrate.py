"""`snapshop catalog migrate`: a catalog copied without re-embedding, checked, resumable."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snapshop.catalog.blobs import write_blob
from snapshop.catalog.catalog import Catalog, create_catalog, open_catalog
from snapshop.catalog.migrate import migrate_catalog
from snapshop.catalog.store import NewCrop
from snapshop.errors import CatalogError

DIM = 16


def _jpeg(seed: int) -> tuple[bytes, int, int]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue(), 64, 48


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def build_source(directory: Path, n_products: int = 5, per_product: int = 2) -> Catalog:
    """A catalog directory with image files, crops and vectors (no model needed)."""
    import hashlib

    catalog = create_catalog(directory, model_id="m@1", model_ref="m", dim=DIM)
    catalog.record_detector("segmenter")
    rng = np.random.default_rng(0)
    with catalog.writing() as write:
        for p in range(n_products):
            product_id = write.upsert_product(
                f"sku-{p}", title=f"Product {p}", price=10.0 + p, category="shirt",
                attributes={"colour": "red", "n": p},
            )  # fmt: skip
            for i in range(per_product):
                data, width, height = _jpeg(p * 10 + i)
                sha = hashlib.sha256(data).hexdigest()
                crops = [NewCrop("upper", "top", 0.9, (1.0, 2.0, 30.0, 40.0), _unit(rng))]
                if i == 0:
                    crops.append(
                        NewCrop("lower", "skirt", 0.8, (2.0, 20.0, 60.0, 47.0), _unit(rng))
                    )
                blob = write_blob(catalog.blob_dir, sha, data)
                write.insert_image(
                    product_id, source=f"/shop/{p}/{i}.jpg", blob=blob, sha256=sha,
                    width=width, height=height, vector=_unit(rng), crops=crops,
                )  # fmt: skip
    catalog.save_indexes()
    return catalog


def _snapshot(catalog: Catalog) -> dict[str, object]:
    """Everything a copy must preserve, keyed by what survives a copy (sku, sha256)."""
    out: dict[str, object] = {}
    for product in catalog.list_products(limit=1000):
        images = {}
        for image in catalog.images_of(product.id):
            vec = next(v for _, v in catalog.store.iter_vectors("images", DIM, ids=[image.id]))[0]
            crops = catalog.store.crops_of_image(image.id)
            crop_vecs = {}
            for ids, vecs in catalog.store.iter_vectors("crops", DIM, ids=[c.id for c in crops]):
                crop_vecs.update(zip(ids.tolist(), vecs.tolist(), strict=True))
            images[image.sha256] = (
                image.source, image.width, image.height, vec.tolist(),
                sorted((c.position, c.label, c.score, c.box, crop_vecs[c.id]) for c in crops),
            )  # fmt: skip
        out[product.sku] = (product.title, product.price, product.category, product.attributes,
                            images)  # fmt: skip
    return out


def test_directory_to_directory_copies_rows_vectors_files_and_card(tmp_path: Path) -> None:
    with build_source(tmp_path / "src") as src:
        expected = _snapshot(src)
    report = migrate_catalog(tmp_path / "src", tmp_path / "dst")
    assert (report.products, report.images_copied, report.crops_copied) == (5, 10, 15)
    assert report.vectors_checked > 0 and report.images_without_file == 0
    with open_catalog(tmp_path / "dst") as dst:
        assert _snapshot(dst) == expected
        assert dst.card.detector == "segmenter" and dst.model_id == "m@1"
        for product in dst.list_products():
            for image in dst.images_of(product.id):
                assert image.blob and (dst.directory / image.blob).is_file()
        # searchable at once: an image's own vector finds it first
        image = dst.images_of(dst.list_products()[0].id)[0]
        vec = next(v for _, v in dst.store.iter_vectors("images", DIM, ids=[image.id]))
        index = dst.index(None)
        assert index is not None and int(index.search(vec, 1).ids[0, 0]) == image.id


def test_rerun_resumes_without_duplicates(tmp_path: Path) -> None:
    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst", page=2)
    again = migrate_catalog(tmp_path / "src", tmp_path / "dst", page=2)
    assert (again.images_copied, again.images_present) == (0, 10)
    with open_catalog(tmp_path / "dst") as dst:
        assert dst.counts() == {"products": 5, "images": 10, "crops": 15}


def test_interrupted_copy_is_completed_by_a_rerun(tmp_path: Path, monkeypatch) -> None:
    """A copy that dies after its first page leaves whole pages; the rerun completes it."""
    from snapshop.catalog import migrate

    build_source(tmp_path / "src").close()
    real = migrate._copy_product
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the second page (pages of 3 products)
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(migrate, "_copy_product", dying)
    with pytest.raises(RuntimeError):
        migrate_catalog(tmp_path / "src", tmp_path / "dst", page=3)
    with open_catalog(tmp_path / "dst") as dst:
        assert dst.counts()["products"] == 3  # the first page only: the second rolled back
    monkeypatch.setattr(migrate, "_copy_product", real)
    report = migrate_catalog(tmp_path / "src", tmp_path / "dst", page=3)
    assert (report.images_present, report.images_copied) == (6, 4)


def test_target_of_another_model_is_refused(tmp_path: Path) -> None:
    build_source(tmp_path / "src").close()
    create_catalog(tmp_path / "dst", model_id="other@2", model_ref="o", dim=DIM).close()
    with pytest.raises(CatalogError, match="cannot share a catalog"):
        migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with open_catalog(tmp_path / "dst") as dst:
        assert dst.counts()["products"] == 0


@pytest.mark.server
def test_directory_to_server_and_back(tmp_path: Path, pg_database: str) -> None:
    """To PostgreSQL: rows, vectors and crops as they were, thumbnails made from the files;
    back to a directory: the same again, with no files (a server keeps thumbnails only)."""
    with build_source(tmp_path / "src") as src:
        expected = _snapshot(src)
    there = migrate_catalog(tmp_path / "src", pg_database)
    assert (there.images_copied, there.thumbnails, there.images_without_file) == (10, 10, 0)
    with open_catalog(pg_database) as server:
        assert server.is_server and _snapshot(server) == expected
        image = server.images_of(server.list_products()[0].id)[0]
        data, media = server.stored_thumbnail(image)
        assert media == "image/jpeg" and Image.open(io.BytesIO(data)).size == (64, 48)
        assert server.card.detector == "segmenter"
    back = migrate_catalog(pg_database, tmp_path / "back")
    assert (back.images_copied, back.images_without_file) == (10, 10)
    with open_catalog(tmp_path / "back") as copy:
        assert _snapshot(copy) == expected
    again = migrate_catalog(tmp_path / "src", pg_database)
    assert (again.images_copied, again.images_present) == (0, 10)
