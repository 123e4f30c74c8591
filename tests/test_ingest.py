"""Ingest: folder and CSV sources, idempotency, update, sync, delete, bad input, crashes, races."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import (
    check_catalog_dir,
    copy_catalog,
    db_rows,
    make_images,
    products_of,
    shop_csv,
    write_csv,
)
from PIL import Image

from snapshop import api
from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.data.sources import read_csv_manifest
from snapshop.errors import CatalogError, ManifestError


@pytest.fixture()
def shop(tmp_path: Path) -> dict[str, list[Path]]:
    return make_images(tmp_path / "shop", n_products=4, per_product=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, lite0_model_dir: Path) -> dict[str, Any]:
    """A shop (4 products x 3 images, never modified) indexed from its CSV once per module."""
    root = tmp_path_factory.mktemp("base")
    images = make_images(root / "shop", n_products=4, per_product=3)
    csv_path = shop_csv(root / "shop.csv", images)
    ingest(csv_path, root / "cat", lite0_model_dir)
    return {"images": images, "csv": csv_path, "catalog": root / "cat"}


@pytest.fixture()
def cat(base: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the base catalog."""
    return copy_catalog(base["catalog"], tmp_path / "cat")


def ingest(source: Path | list, catalog_dir: Path, model_dir: Path, **kwargs: object):
    return api.index_source(source, catalog_dir, model=str(model_dir), **kwargs)  # type: ignore[arg-type]


def test_ingest_folder(tmp_path: Path, shop: dict[str, list[Path]], lite0_model_dir: Path) -> None:
    report = ingest(tmp_path / "shop", tmp_path / "cat", lite0_model_dir)
    assert (report.added, report.skipped, report.failed) == (12, 0, [])
    assert report.products == set(shop)
    rows = db_rows(
        tmp_path / "cat",
        "SELECT p.sku, p.title, i.source, i.blob, i.width, i.sha256"
        " FROM images i JOIN products p ON p.id = i.product_id",
    )
    assert len(rows) == 12
    assert {r[0] for r in rows} == set(shop)
    assert all(r[1] == r[0] for r in rows)  # folder name is the title
    assert {r[2] for r in rows} == {str(p) for ps in shop.values() for p in ps}
    for _, _, _, blob, width, _ in rows:
        assert (tmp_path / "cat" / blob).is_file() and width == 96
    assert check_catalog_dir(tmp_path / "cat") == {"products": 4, "images": 12, "crops": 0}


def test_ingest_csv_with_metadata(
    tmp_path: Path, shop: dict[str, list[Path]], lite0_model_dir: Path
) -> None:
    csv_path = shop_csv(tmp_path / "shop.csv", shop)
    report = ingest(csv_path, tmp_path / "cat", lite0_model_dir)
    assert report.added == 12 and not report.failed
    meta = products_of(4)
    catalog = open_catalog(tmp_path / "cat")
    try:
        for sku, product in meta.items():
            stored = catalog.store.find_product(sku)
            assert stored is not None
            assert stored.title == product.title and stored.price == product.price
            assert stored.url == f"https://shop.example/{sku}"
            assert stored.category == product.shape
            assert len(catalog.store.images_of(stored.id)) == 3
    finally:
        catalog.close()


def test_csv_extra_columns_become_attributes(tmp_path: Path, lite0_model_dir: Path) -> None:
    images = make_images(tmp_path / "shop", n_products=1, per_product=1)
    sku, [path] = next(iter(images.items()))
    csv_path = write_csv(
        tmp_path / "a.csv",
        [[sku, path.name, "red", "M"]],
        ["product_id", "image_path", "colour", "size"],
    )
    (tmp_path / path.name).write_bytes(path.read_bytes())  # relative to the CSV's folder
    ingest(csv_path, tmp_path / "cat", lite0_model_dir)
    catalog = open_catalog(tmp_path / "cat")
    try:
        product = catalog.store.find_product(sku)
        assert product is not None and product.attributes == {"colour": "red", "size": "M"}
    finally:
        catalog.close()


def test_reingest_is_idempotent(base: dict[str, Any], cat: Path, lite0_model_dir: Path) -> None:
    assert check_catalog_dir(cat) == {"products": 4, "images": 12, "crops": 0}
    ids = sorted(db_rows(cat, "SELECT id, sha256 FROM images"))
    blobs = sorted((cat / "blobs").rglob("*"))
    second = ingest(base["csv"], cat, lite0_model_dir, batch_size=5)
    assert (second.added, second.skipped, second.failed, second.removed) == (0, 12, [], 0)
    assert check_catalog_dir(cat) == {"products": 4, "images": 12, "crops": 0}
    assert sorted(db_rows(cat, "SELECT id, sha256 FROM images")) == ids
    assert sorted((cat / "blobs").rglob("*")) == blobs
    # the same files again through the folder reader: still the same images, and the CSV's
    # titles are not replaced by folder names; nothing was written at all
    generation = db_rows(cat, "SELECT value FROM meta WHERE key = 'generation'")
    third = ingest(base["csv"].parent / "shop", cat, lite0_model_dir)
    assert (third.added, third.skipped) == (0, 12)
    assert sorted(db_rows(cat, "SELECT id, sha256 FROM images")) == ids
    titles = dict(db_rows(cat, "SELECT sku, title FROM products"))
    assert titles == {sku: p.title for sku, p in products_of(4).items()}
    assert db_rows(cat, "SELECT value FROM meta WHERE key = 'generation'") == generation


def test_duplicate_rows_and_shared_files(tmp_path: Path, lite0_model_dir: Path) -> None:
    images = make_images(tmp_path / "shop", n_products=2, per_product=1)
    (a, [pa]), (b, _) = images.items()
    csv_path = write_csv(
        tmp_path / "d.csv",
        [[a, pa, "", "", "", ""], [a, pa, "", "", "", ""], [b, pa, "", "", "", ""]],
    )
    report = ingest(csv_path, tmp_path / "cat", lite0_model_dir)
    # the same file twice for one product is one image; the same file for two products is two
    assert (report.added, report.skipped) == (2, 1)
    assert check_catalog_dir(tmp_path / "cat")["images"] == 2


def test_update_metadata_by_reingest(
    base: dict[str, Any], cat: Path, tmp_path: Path, lite0_model_dir: Path
) -> None:
    shop = base["images"]
    sku = next(iter(shop))
    rows = [[sku, shop[sku][0], "New title", "https://new.example/x", "1.5", "sale"]]
    report = ingest(write_csv(tmp_path / "upd.csv", rows), cat, lite0_model_dir)
    assert (report.added, report.skipped) == (0, 1)
    catalog = open_catalog(cat)
    try:
        product = catalog.store.find_product(sku)
        assert product is not None
        assert (product.title, product.price, product.category) == ("New title", 1.5, "sale")
        assert product.url == "https://new.example/x"
        assert len(catalog.store.images_of(product.id)) == 3  # no sync: images stay
        other = catalog.store.find_product(list(shop)[1])
        assert other is not None and other.title == products_of(4)[other.sku].title
    finally:
        catalog.close()


def test_sync_removes_images_no_longer_listed(
    tmp_path: Path, shop: dict[str, list[Path]], lite0_model_dir: Path
) -> None:
    ingest(shop_csv(tmp_path / "shop.csv", shop), tmp_path / "cat", lite0_model_dir)
    sku_a, sku_b = list(shop)[:2]
    new_image = tmp_path / "shop" / sku_a / "new.jpg"
    Image.open(shop[sku_b][0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new_image)
    # a keeps image 0, drops 1, lists a missing file 2 (unreadable: kept), gains new.jpg;
    # b is not listed at all (untouched)
    missing = shop[sku_a][2]
    missing.rename(tmp_path / "elsewhere.jpg")
    rows = [
        [sku_a, shop[sku_a][0], "", "", "", ""],
        [sku_a, missing, "", "", "", ""],
        [sku_a, new_image, "", "", "", ""],
    ]
    before = dict(db_rows(tmp_path / "cat", "SELECT source, id FROM images"))
    report = ingest(
        write_csv(tmp_path / "a.csv", rows), tmp_path / "cat", lite0_model_dir, sync=True
    )
    assert (report.added, report.skipped, report.removed) == (1, 1, 1)
    assert [f[0] for f in report.failed] == [str(missing)]
    after = dict(db_rows(tmp_path / "cat", "SELECT source, id FROM images"))
    assert str(shop[sku_a][1]) not in after
    assert after[str(shop[sku_a][0])] == before[str(shop[sku_a][0])]
    assert after[str(missing)] == before[str(missing)]
    assert str(new_image) in after
    assert all(str(p) in after for p in shop[sku_b])
    assert check_catalog_dir(tmp_path / "cat") == {"products": 4, "images": 12, "crops": 0}
    gone = before[str(shop[sku_a][1])]
    catalog = open_catalog(tmp_path / "cat")
    try:
        assert gone not in catalog.index(None).ids()
    finally:
        catalog.close()


def test_remove_product(base: dict[str, Any], cat: Path) -> None:
    shop = base["images"]
    sku = list(shop)[2]
    sql = f"SELECT i.id FROM images i JOIN products p ON p.id = i.product_id WHERE p.sku = '{sku}'"
    image_ids = [r[0] for r in db_rows(cat, sql)]
    assert len(image_ids) == 3
    assert api.remove_products(cat, [sku]) == {sku: 3}
    assert db_rows(cat, f"SELECT * FROM products WHERE sku = '{sku}'") == []
    assert check_catalog_dir(cat) == {"products": 3, "images": 9, "crops": 0}
    catalog = open_catalog(cat)
    try:
        assert not set(image_ids) & set(catalog.index(None).ids().tolist())
    finally:
        catalog.close()
    searcher = api.open_searcher(cat)
    try:
        for path in shop[sku]:  # its own photos do not find it any more
            result = searcher.search(path, k=10)
            assert len(result.image_results) == 3
            assert sku not in {h.sku for h in result.image_results}
    finally:
        searcher.catalog.close()
    # unknown keys remove nothing, even when listed with a known one
    with pytest.raises(Exception, match="no product"):
        api.remove_products(cat, [list(shop)[0], "no-such-sku"])
    with pytest.raises(CatalogError, match="no product"):  # beyond SQLite's integers
        api.remove_products(cat, [list(shop)[0], "9" * 30])
    assert check_catalog_dir(cat)["products"] == 3


def test_remove_names_one_product_twice(base: dict[str, Any], cat: Path) -> None:
    """By sku twice, or by sku and id: removed once, not removed then reported missing."""
    first, second = list(base["images"])[:2]
    (first_id,) = db_rows(cat, f"SELECT id FROM products WHERE sku = '{first}'")[0]
    removed = api.remove_products(cat, [first, first, second], ids=[first_id])
    assert removed == {first: 3, second: 3}
    assert check_catalog_dir(cat)["products"] == 2


def test_rows_of_a_product_may_leave_its_fields_empty(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "p.csv",
        [
            ["p1", "a.jpg", "Red tee", "", "9.5", ""],
            ["p1", "b.jpg", "", "", "", "tops"],
            ["p2", "c.jpg", "Other", "", "1", "tops"],
        ],
    )
    assert [r.metadata.get("title") for r in read_csv_manifest(path)] == ["Red tee", None, "Other"]


BAD_CSVS = {
    "missing_column": ("product_id,title\np1,x\n", "missing column", None),
    "empty_product_id": ("product_id,image_path\np1,{img}\n ,{img}\n", "empty product_id", 3),
    "empty_image_path": ("product_id,image_path\np1,\n", "empty image_path", 2),
    "bad_price": ("product_id,image_path,price\np1,{img},9.99\np2,{img},cheap\n", "price", 3),
    "negative_price": ("product_id,image_path,price\np1,{img},-1\n", "price", 2),
    "too_many_fields": ("product_id,image_path\np1,{img}\np2,{img},extra\n", "more fields", 3),
    "empty_file": ("", "missing column", None),
    "header_only": ("product_id,image_path\n", "no rows", None),
    # an open quote would swallow every later row into one field: p2 would vanish silently
    "unbalanced_quote": (
        'product_id,image_path,title\np1,{img},"Red\np2,{img},Blue\n',
        "malformed csv",
        2,
    ),
    "repeated_column": ("product_id,image_path,product_id\np1,{img},p2\n", "more than once", None),
    "conflicting_rows": (
        "product_id,image_path,price\np1,{img},10\np1,{img},12.5\n",
        "has price 12.5, but line 2 gives 10.0",
        3,
    ),
    "nul_in_path": ("product_id,image_path\np1,{img}\x00.jpg\n", "nul byte", 2),
    "field_too_long": (
        "product_id,image_path,title\np1,{img},x\np2,{img}," + "x" * (1 << 21) + "\n",
        "field larger",
        3,
    ),
    "semicolons": ("product_id;image_path\np1;{img}\n", "separated by commas", None),
    "control_in_sku": ("product_id,image_path\np\x1b1,{img}\n", "control characters", 2),
    "script_url": ("product_id,image_path,url\np1,{img},javascript:alert(1)\n", "https://", 2),
}


@pytest.mark.parametrize("case", [*BAD_CSVS, "non_utf8"])
def test_bad_csv_writes_nothing(
    tmp_path: Path, lite0_model_dir: Path, base: dict[str, Any], cat: Path, case: str
) -> None:
    img = next(iter(base["images"].values()))[0]
    path = tmp_path / "bad.csv"
    if case == "non_utf8":
        path.write_bytes(f"product_id,image_path,title\np1,{img},caf".encode() + b"\xe9\xff\n")
        words, line = "utf-8", None
    else:
        text, words, line = BAD_CSVS[case]
        path.write_text(text.format(img=img))
    # a new catalog is not even created
    with pytest.raises(ManifestError) as info:
        ingest(path, tmp_path / "new-cat", lite0_model_dir)
    message = str(info.value)
    assert str(path) in message and words in message.lower()
    if line is not None:
        assert f"{path}:{line}:" in message
    assert not (tmp_path / "new-cat").exists()
    # an existing catalog is left exactly as it was
    generation = db_rows(cat, "SELECT value FROM meta WHERE key='generation'")
    with pytest.raises(ManifestError):
        ingest(path, cat, lite0_model_dir)
    assert db_rows(cat, "SELECT value FROM meta WHERE key='generation'") == generation
    assert check_catalog_dir(cat)["images"] == 12


def test_csv_line_numbers_count_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    # a line break is fine in an attribute (not in a title, which is one line of text)
    path.write_text('product_id,image_path,notes\np1,a.jpg,"two\nlines"\np2,b.jpg,x,y\n')
    with pytest.raises(ManifestError, match=r"m\.csv:4:"):
        read_csv_manifest(path)


def test_corrupt_images_reported_and_others_ingested(
    tmp_path: Path,
    shop: dict[str, list[Path]],
    lite0_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sku = next(iter(shop))
    good = shop[sku][0].read_bytes()
    (tmp_path / "shop" / sku / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "shop" / sku / "notes.jpg").write_text("not an image")
    (tmp_path / "shop" / sku / "empty.png").write_bytes(b"")
    locked = tmp_path / "shop" / sku / "locked.jpg"
    locked.write_bytes(good)
    locked.chmod(0)
    workers = None
    if os.geteuid() == 0:  # root reads any file: make this one fail as it would for a user
        workers = 0  # in this process, where the patch applies
        read_bytes = Path.read_bytes

        def refuse_locked(self: Path) -> bytes:
            if self.name == locked.name:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    report = ingest(
        tmp_path / "shop", tmp_path / "cat", lite0_model_dir, batch_size=4, workers=workers
    )
    assert report.added == 12
    failed = {Path(s).name: reason for s, reason in report.failed}
    assert set(failed) == {"cut.jpg", "notes.jpg", "empty.png", "locked.jpg"}
    assert "truncated" in failed["cut.jpg"] and "not an image" in failed["notes.jpg"]
    assert "empty" in failed["empty.png"] and "cannot read" in failed["locked.jpg"]
    assert check_catalog_dir(tmp_path / "cat")["images"] == 12
    assert report.to_dict()["failed"][0]["reason"]


def test_failure_between_commit_and_index_update(
    tmp_path: Path,
    shop: dict[str, list[Path]],
    lite0_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows committed but the process dies before the vectors reach the index: recovered."""
    calls = {"n": 0}
    original = Catalog.add_vectors

    def dying_add_vectors(self: Catalog, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash after commit")
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Catalog, "add_vectors", dying_add_vectors)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path / "shop", tmp_path / "cat", lite0_model_dir, batch_size=4)
    monkeypatch.undo()
    # two batches committed; the saved index file (if any) has at most the first
    assert len(db_rows(tmp_path / "cat", "SELECT id FROM images")) == 8
    assert check_catalog_dir(tmp_path / "cat")["images"] == 8
    report = ingest(tmp_path / "shop", tmp_path / "cat", lite0_model_dir, batch_size=4)
    assert (report.added, report.skipped) == (4, 8)
    assert check_catalog_dir(tmp_path / "cat")["images"] == 12


def test_failure_inside_transaction_rolls_back(
    tmp_path: Path,
    shop: dict[str, list[Path]],
    lite0_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from snapshop.catalog.store import CatalogStore

    calls = {"n": 0}
    original = CatalogStore.insert_image

    def failing_insert(self: CatalogStore, *args: object, **kwargs: object):
        calls["n"] += 1
        if calls["n"] == 6:  # the second image of the second batch
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CatalogStore, "insert_image", failing_insert)
    with pytest.raises(RuntimeError):
        ingest(tmp_path / "shop", tmp_path / "cat", lite0_model_dir, batch_size=4)
    monkeypatch.undo()
    assert check_catalog_dir(tmp_path / "cat")["images"] == 4  # the whole second batch rolled back
    assert ingest(tmp_path / "shop", tmp_path / "cat", lite0_model_dir).added == 8


WORKER = textwrap.dedent(
    """
    import sys
    from snapshop import api

    if __name__ == "__main__":  # ingest may spawn decode workers, which re-import this file
        source, catalog, model, batch = sys.argv[1:5]
        report = api.index_source(source, catalog, model=model, batch_size=int(batch))
        print("added", report.added, "skipped", report.skipped, "failed", len(report.failed))
    """
)


def start_worker(tmp_path: Path, source: Path, catalog: Path, model: Path, batch: int):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(script), str(source), str(catalog), str(model), str(batch)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: kill -9 takes its workers too
    )


def count_images(catalog: Path) -> int:
    try:
        return len(db_rows(catalog, "SELECT id FROM images"))
    except sqlite3.Error:
        return 0


def test_kill_9_mid_ingest_recovers(tmp_path: Path, lite0_model_dir: Path) -> None:
    images = make_images(tmp_path / "shop", n_products=10, per_product=6, size=64)
    total = sum(len(v) for v in images.values())
    cat = tmp_path / "cat"
    proc = start_worker(tmp_path, tmp_path / "shop", cat, lite0_model_dir, batch=1)
    deadline = time.monotonic() + 60
    try:
        while count_images(cat) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the ingest and any decode workers, at once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    stored = count_images(cat)
    assert 3 <= stored < total, "the kill did not land mid-ingest"
    counts = check_catalog_dir(cat)  # opens, reconciles: index ids == store ids
    assert counts["images"] == stored
    report = ingest(tmp_path / "shop", cat, lite0_model_dir)
    assert report.added == total - stored and report.skipped == stored
    assert check_catalog_dir(cat) == {"products": 10, "images": total, "crops": 0}
    shas = db_rows(cat, "SELECT product_id, sha256, COUNT(*) FROM images GROUP BY 1, 2")
    assert all(n == 1 for _, _, n in shas)


def test_images_another_writer_added_meanwhile_still_count_their_products(
    base: dict[str, Any], cat: Path, lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second of two runs over one source finds every image committed by the first only
    at write time: its report must still name the source's products, not "0 products"."""
    from snapshop.catalog.store import CatalogStore

    monkeypatch.setattr(CatalogStore, "has_image", lambda self, product_id, sha256: False)
    report = ingest(base["csv"], cat, lite0_model_dir, workers=0)
    assert (report.added, report.skipped) == (0, 12)
    assert report.products == set(base["images"])


def test_concurrent_writers_create_and_fill_one_catalog(
    tmp_path: Path, lite0_model_dir: Path
) -> None:
    """Two processes create the same new catalog and ingest different products at once."""
    first = make_images(tmp_path / "a", n_products=3, per_product=4, size=64, seed=1)
    second = make_images(tmp_path / "b", n_products=3, per_product=4, size=64, seed=2)
    # the two seeds draw different demo products; make the skus distinct too
    for sku in list(second):
        (tmp_path / "b" / sku).rename(tmp_path / "b" / f"b-{sku}")
    cat = tmp_path / "cat"
    procs = [start_worker(tmp_path, tmp_path / d, cat, lite0_model_dir, batch=2) for d in "ab"]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr
        assert "added 12 skipped 0 failed 0" in stdout
    skus = {r[0] for r in db_rows(cat, "SELECT sku FROM products")}
    assert skus == set(first) | {f"b-{s}" for s in second}
    assert check_catalog_dir(cat) == {"products": 6, "images": 24, "crops": 0}


def test_concurrent_writer_seen_by_open_catalog(
    tmp_path: Path, lite0_model_dir: Path, lite0_embedder
) -> None:
    """A catalog held open in one process picks up another writer's images on refresh,
    and saving its indexes does not drop them."""
    make_images(tmp_path / "a", n_products=2, per_product=2, size=64, seed=3)
    make_images(tmp_path / "b", n_products=2, per_product=2, size=64, seed=4)
    for sku in list((tmp_path / "b").iterdir()):
        sku.rename(tmp_path / "b" / f"b-{sku.name}")
    cat = tmp_path / "cat"
    ingest(tmp_path / "a", cat, lite0_model_dir)
    held = open_catalog(cat)
    try:
        assert len(held.index(None)) == 4
        ingest(tmp_path / "b", cat, lite0_model_dir)  # another writer (own connection)
        with held.write_lock():
            held.save_indexes()  # must not persist a 4-vector index over an 8-image store
        assert len(held.index(None)) == 8
        held.refresh()
        assert np.array_equal(np.sort(held.index(None).ids()), np.sort(held.store.image_ids()))
    finally:
        held.close()
    from snapshop.index import load_index

    index, _ = load_index(cat / "index" / "images.faiss")
    assert len(index) == 8
