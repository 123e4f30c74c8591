"""`snapshop catalog migrate` onto an older copy of the same catalog: ``--mirror`` leaves the
target equal to the source (what the source dropped is removed, what it replaced is replaced),
without it the target keeps and counts what the source lacks; a server -> server copy counts
the thumbnails it copies. Every comparison is against the full content of both catalogs."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_catalog_migrate import DIM, build_source
from typer.testing import CliRunner

from snapshop.catalog.blobs import write_blob
from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.catalog.migrate import migrate_catalog
from snapshop.catalog.store import NewCrop
from snapshop.cli import app
from snapshop.errors import CatalogError


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _vector(catalog: Catalog, table: str, row_id: int) -> bytes:
    _, vecs = next(catalog.store.iter_vectors(table, DIM, ids=[row_id]))
    return vecs[0].tobytes()


def _stored_file(catalog: Catalog, sha256: str, blob: str | None) -> bytes | None:
    """What the catalog keeps of an image's file: a server's thumbnail, a directory's file."""
    if catalog.is_server:
        found = catalog.store.get_blob(sha256)
        return None if found is None else found[0]
    return None if blob is None else (catalog.directory / blob).read_bytes()


def _content(catalog: Catalog) -> dict[str, Any]:
    """Everything a copy must hold, keyed by what survives a copy (sku, sha256): every field
    of every product, image and crop, every vector bit for bit, the stored files, the card."""
    products: dict[str, Any] = {}
    for product in catalog.list_products(limit=10_000):
        images = {}
        for image in catalog.images_of(product.id):
            crops = sorted(
                (c.position, c.label, c.score, c.box, _vector(catalog, "crops", c.id))
                for c in catalog.store.crops_of_image(image.id)
            )
            images[image.sha256] = (
                image.source, image.width, image.height, _vector(catalog, "images", image.id),
                crops, _stored_file(catalog, image.sha256, image.blob),
            )  # fmt: skip
        products[product.sku] = (
            product.title, product.url, product.price, product.currency, product.category,
            product.attributes, images,
        )  # fmt: skip
    card = (catalog.model_id, catalog.dim, catalog.crop_mode, catalog.detector,
            catalog.catalog_views)  # fmt: skip
    return {"products": products, "card": card, "counts": catalog.counts()}


def _ids(catalog: Catalog, sku: str) -> tuple[int, list[int], list[int]]:
    """The ids the target gave a product, its images and their crops."""
    product = catalog.find_product(sku)
    assert product is not None
    images = catalog.images_of(product.id)
    crops = [c.id for image in images for c in catalog.store.crops_of_image(image.id)]
    return product.id, [image.id for image in images], crops


def _add_image(catalog: Catalog, write: Any, product_id: int, seed: int, vector_seed: int) -> str:
    """Give ``product_id`` the image of ``seed`` (a server keeps its thumbnail, a directory
    its file) with vectors drawn from ``vector_seed``; returns its sha256."""
    data = _jpeg(seed)
    sha = hashlib.sha256(data).hexdigest()
    rng = np.random.default_rng(vector_seed)
    if catalog.is_server:
        write.put_thumbnail(sha, data, 64, 48)
        blob = None
    else:
        blob = write_blob(catalog.blob_dir, sha, data)
    write.insert_image(
        product_id, source=f"/shop/new/{seed}.jpg", blob=blob, sha256=sha, width=64, height=48,
        vector=_unit(rng), crops=[NewCrop("upper", "coat", 0.7, (3.0, 4.0, 50.0, 40.0),
                                          _unit(rng))],
    )  # fmt: skip
    return sha


def _age(source: Catalog) -> None:
    """What a live catalog goes through after it was copied: a product removed (sku-1), an
    image removed (sku-2's second), a product removed and added again with fewer fields and
    one of its images re-embedded (sku-3: same bytes, other vectors and crops), a new product
    (sku-9). sku-0 and sku-4 do not change."""
    product = source.find_product("sku-1")
    assert product is not None
    source.remove_product(product.id)
    product = source.find_product("sku-2")
    assert product is not None
    source.remove_images([source.images_of(product.id)[1].id])
    product = source.find_product("sku-3")
    assert product is not None
    source.remove_product(product.id)
    with source.writing() as write:
        again = write.upsert_product("sku-3", title="Back again", attributes={"colour": "blue"})
        _add_image(source, write, again, seed=30, vector_seed=99)  # sku-3's first image's bytes
        new = write.upsert_product("sku-9", title="New", price=5.0, currency="EUR")
        _add_image(source, write, new, seed=90, vector_seed=90)
    source.save_indexes()


def _index_ids(catalog: Catalog) -> set[int]:
    index = catalog.index(None)
    assert index is not None
    vectors = np.stack([np.frombuffer(_vector(catalog, "images", int(i)), dtype=np.float32)
                        for i in catalog.store.image_ids()])  # fmt: skip
    return {int(i) for i in index.search(vectors, 1).ids[:, 0]}


def test_rerun_onto_an_older_copy_keeps_and_counts_what_the_source_dropped(
    tmp_path: Path,
) -> None:
    """The rerun merged (an image the source dropped stayed, unreported) or, once the source
    had dropped a product, refused its own copy as "another catalog". Without --mirror the
    target keeps them and the report counts them; what the source replaced is replaced."""
    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with open_catalog(tmp_path / "src") as src:
        _age(src)
    report = migrate_catalog(tmp_path / "src", tmp_path / "dst")
    assert not report.mirror
    assert (report.products_not_in_source, report.images_not_in_source) == (1, 4)
    assert (report.images_copied, report.images_replaced, report.images_present) == (1, 1, 5)
    with open_catalog(tmp_path / "dst") as dst:
        assert dst.counts() == {"products": 6, "images": 11, "crops": 15}
        assert dst.find_product("sku-1") is not None


def test_mirror_makes_an_older_directory_copy_equal_to_the_source(tmp_path: Path) -> None:
    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with open_catalog(tmp_path / "dst") as dst:
        kept = {sku: _ids(dst, sku) for sku in ("sku-0", "sku-2", "sku-4")}
        sku_3 = _ids(dst, "sku-3")[0]
    with open_catalog(tmp_path / "src") as src:
        _age(src)
        src.record_detector("yolo-garments")  # the card goes too (only --mirror takes it)
        expected = _content(src)
    with pytest.raises(CatalogError, match="built differently.*--mirror makes it equal"):
        migrate_catalog(tmp_path / "src", tmp_path / "dst")
    report = migrate_catalog(tmp_path / "src", tmp_path / "dst", mirror=True)
    assert report.mirror
    assert (report.products_not_in_source, report.images_not_in_source) == (1, 4)
    assert (report.images_copied, report.images_replaced, report.products) == (1, 1, 5)
    with open_catalog(tmp_path / "dst") as dst:
        assert _content(dst) == expected
        # rows that did not change keep their ids; a product the source re-created keeps its
        assert {sku: _ids(dst, sku) for sku in ("sku-0", "sku-4")} == {
            sku: kept[sku] for sku in ("sku-0", "sku-4")
        }
        product_id, image_ids, crop_ids = kept["sku-2"]  # its second image went
        assert _ids(dst, "sku-2") == (product_id, image_ids[:1], crop_ids[:2])
        assert _ids(dst, "sku-3")[0] == sku_3
        assert _index_ids(dst) == {int(i) for i in dst.store.image_ids()}
        shas = {image.sha256 for p in dst.list_products(limit=100) for image in dst.images_of(p.id)}
        files = {path.name for path in dst.blob_dir.rglob("*") if path.is_file()}
        assert {name[:64] for name in files} == shas  # the dropped images' files went too
    again = migrate_catalog(tmp_path / "src", tmp_path / "dst", mirror=True)
    assert (again.images_copied, again.images_replaced, again.images_not_in_source) == (0, 0, 0)


@pytest.mark.server
def test_server_to_server_counts_thumbnails_and_mirrors(tmp_path: Path, pg_dsn: str) -> None:
    """Server -> server reported 0 thumbnails though it copied all 10."""
    from pg_helpers import fresh_database

    build_source(tmp_path / "src").close()
    with fresh_database(pg_dsn) as first, fresh_database(pg_dsn) as second:
        migrate_catalog(tmp_path / "src", first)
        report = migrate_catalog(first, second)
        assert (report.images_copied, report.thumbnails, report.images_without_file) == (10, 10, 0)
        with open_catalog(first) as src, open_catalog(second) as dst:
            assert _content(dst) == _content(src)
            _age(src)
            expected = _content(src)
        report = migrate_catalog(first, second, mirror=True)
        assert (report.images_copied, report.images_replaced, report.thumbnails) == (1, 1, 2)
        assert (report.products_not_in_source, report.images_not_in_source) == (1, 4)
        with open_catalog(second) as dst:
            assert _content(dst) == expected
            shas = {i.sha256 for p in dst.list_products() for i in dst.images_of(p.id)}
            with dst.store.transaction(bump=False) as db:
                stored = {row[0] for row in db.execute("SELECT sha256 FROM blobs").fetchall()}
            assert stored == shas  # no thumbnail of a removed image is left behind


def test_mirror_still_refuses_another_catalog(tmp_path: Path) -> None:
    """A target that is not a copy of the source is never mirrored (its products would go):
    neither one built apart, nor a copy of another catalog."""
    build_source(tmp_path / "src").close()
    with build_source(tmp_path / "other", n_products=2) as other, other.writing() as write:
        write.upsert_product("theirs-only", title="Not in the source")
    migrate_catalog(tmp_path / "other", tmp_path / "copy-of-other")
    for target in ("other", "copy-of-other"):
        with pytest.raises(
            CatalogError, match=r"holds 1 products .*'theirs-only'.*another catalog"
        ):
            migrate_catalog(tmp_path / "src", tmp_path / target, mirror=True)
        with open_catalog(tmp_path / target) as untouched:
            assert untouched.counts() == {"products": 3, "images": 4, "crops": 6}


def test_an_interrupted_mirror_loses_nothing_and_a_rerun_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshop.catalog import migrate

    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with open_catalog(tmp_path / "dst") as dst:
        before = _content(dst)["products"]
    with open_catalog(tmp_path / "src") as src:
        _age(src)
        expected = _content(src)
    real = migrate._copy_product
    calls = {"n": 0}

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # inside the second page: sku-4 done, sku-3 dies
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(migrate, "_copy_product", dying)
    with pytest.raises(RuntimeError):
        migrate_catalog(tmp_path / "src", tmp_path / "dst", page=2, mirror=True)
    with open_catalog(tmp_path / "dst") as dst:
        now = _content(dst)["products"]
    # the first page (sku-0, sku-2) is synced, the second rolled back, the rest untouched
    assert now["sku-0"] == expected["products"]["sku-0"]
    assert now["sku-2"] == expected["products"]["sku-2"]
    assert {sku: now[sku] for sku in ("sku-1", "sku-3", "sku-4")} == {
        sku: before[sku] for sku in ("sku-1", "sku-3", "sku-4")
    }
    monkeypatch.setattr(migrate, "_copy_product", real)
    migrate_catalog(tmp_path / "src", tmp_path / "dst", page=2, mirror=True)
    with open_catalog(tmp_path / "dst") as dst:
        assert _content(dst) == expected


def test_cli_says_what_the_target_kept_and_mirror_removes_it(tmp_path: Path) -> None:
    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with open_catalog(tmp_path / "src") as src:
        _age(src)
    runner = CliRunner()
    kept = runner.invoke(app, ["catalog", "migrate", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert kept.exit_code == 0, kept.output
    assert "1 products and 4 images the source does not have" in " ".join(kept.output.split())
    assert "--mirror" in kept.output
    mirrored = runner.invoke(
        app, ["catalog", "migrate", str(tmp_path / "src"), str(tmp_path / "dst"), "--mirror"]
    )
    assert mirrored.exit_code == 0, mirrored.output
    assert "removed 1 products and 4 images" in " ".join(mirrored.output.split())
    with open_catalog(tmp_path / "dst") as dst:
        assert dst.counts() == {"products": 5, "images": 7, "crops": 10}


def _rerun_queries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_product: int) -> int:
    """Store queries (both catalogs) of a migrate run again onto its complete copy: 6
    products of ``per_product`` images, 2 products a page."""
    from snapshop.catalog.store import CatalogStore

    source, target = tmp_path / f"src-{per_product}", tmp_path / f"dst-{per_product}"
    build_source(source, n_products=6, per_product=per_product).close()
    migrate_catalog(source, target)
    real = CatalogStore._query
    count = {"n": 0}

    def counted(self: CatalogStore, *args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(CatalogStore, "_query", counted)
        report = migrate_catalog(source, target, page=2)
    assert (report.images_present, report.images_copied) == (6 * per_product, 0)
    return count["n"]


def test_a_rerun_reads_each_page_in_a_few_queries_however_many_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun read each image's crops and vectors on both sides one query at a time (about
    8 queries an image, the check's sample included): a million images resumed took
    millions of queries. Now a page of products costs the same few queries on each side
    whether its products hold one image or ten."""
    one, ten = (_rerun_queries(tmp_path, monkeypatch, n) for n in (1, 10))
    assert ten == one  # 71 here; the code before: 130 and 562
