"""Blob files: freed with their last image, and garbage collection of orphans and temp files."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import (
    check_catalog_dir,
    copy_catalog,
    db_rows,
    make_images,
    shop_csv,
    write_csv,
)
from typer.testing import CliRunner

from snapshop import api, config
from snapshop.catalog import blobs
from snapshop.catalog.blobs import write_blob
from snapshop.catalog.catalog import Catalog, open_catalog
from snapshop.catalog.store import CatalogStore
from snapshop.cli import app
from snapshop.demo import demo_products, render
from snapshop.errors import ConfigError

TWO_HOURS = 2 * 3600.0
SHARED_SKU = "shared-copy"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, lite0_model_dir: Path) -> dict[str, Any]:
    """3 products x 2 images, plus a 4th product listing the first product's first photo: that
    photo's blob is shared by two rows."""
    root = tmp_path_factory.mktemp("gc")
    images = make_images(root / "shop", n_products=3, per_product=2, size=64, seed=3)
    csv_path = shop_csv(root / "shop.csv", images)
    first_sku = next(iter(images))
    with open(csv_path, "a") as fh:
        fh.write(f"{SHARED_SKU},{images[first_sku][0]},copy,,,\n")
    report = api.index_source(csv_path, root / "cat", model=str(lite0_model_dir), workers=0)
    assert (report.added, len(report.products)) == (7, 4)
    return {"root": root, "images": images, "csv": csv_path, "catalog": root / "cat"}


@pytest.fixture()
def cat(built: dict[str, Any], tmp_path: Path) -> Path:
    return copy_catalog(built["catalog"], tmp_path / "cat")


@pytest.fixture()
def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """GC's clock runs two hours ahead: every file written so far is past the default grace."""
    real = time.time
    monkeypatch.setattr(blobs, "_now", lambda: real() + TWO_HOURS)


def blob_of(catalog_dir: Path, image: Path) -> Path:
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    found = list((catalog_dir / "blobs" / sha[:2]).glob(f"{sha}.*"))
    assert len(found) == 1, found
    return found[0]


def all_blobs(catalog_dir: Path) -> set[Path]:
    return {p for p in (catalog_dir / "blobs").glob("*/*") if blobs.BLOB_NAME.fullmatch(p.name)}


def referenced_blobs(catalog_dir: Path) -> set[Path]:
    return {catalog_dir / r[0] for r in db_rows(catalog_dir, "SELECT DISTINCT blob FROM images")}


def write_orphan(catalog_dir: Path, seed: int) -> Path:
    """A blob the way ingest writes one, with no row naming it (an ingest that died)."""
    buffer = io.BytesIO()
    render(demo_products(1, seed=seed)[0], seed, size=48).save(buffer, format="JPEG")
    data = buffer.getvalue()
    relative = write_blob(catalog_dir / "blobs", hashlib.sha256(data).hexdigest(), data)
    return catalog_dir / relative


def write_stale_temp(catalog_dir: Path, shard: str = "00") -> Path:
    """A temp file of a blob write interrupted before its rename (same naming as ingest)."""
    folder = catalog_dir / "blobs" / shard
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = config.make_temp(folder)
    with os.fdopen(fd, "wb") as fh:
        fh.write(b"\xff\xd8 half a jpeg")
    return tmp


def gc(catalog_dir: Path, **kwargs: Any) -> blobs.GcReport:
    catalog = open_catalog(catalog_dir)
    try:
        return catalog.collect_garbage(**kwargs)
    finally:
        catalog.close()


# --- blobs freed with their last image ---------------------------------------------------------
def test_remove_product_frees_its_blobs(built: dict[str, Any], cat: Path) -> None:
    sku = list(built["images"])[1]
    mine = {blob_of(cat, p) for p in built["images"][sku]}
    others = all_blobs(cat) - mine
    assert all(p.is_file() for p in mine) and len(others) == 4
    assert api.remove_products(cat, [sku]) == {sku: 2}
    assert not any(p.exists() for p in mine)
    assert all(p.is_file() for p in others)
    assert all_blobs(cat) == referenced_blobs(cat)
    assert check_catalog_dir(cat) == {"products": 3, "images": 5, "crops": 0}


def test_shared_blob_survives_until_its_last_image_goes(built: dict[str, Any], cat: Path) -> None:
    first_sku = list(built["images"])[0]
    shared = blob_of(cat, built["images"][first_sku][0])
    sql = f"SELECT COUNT(*) FROM images WHERE blob = '{shared.relative_to(cat)}'"
    assert db_rows(cat, sql) == [(2,)]
    api.remove_products(cat, [SHARED_SKU])
    assert shared.is_file()  # the first product still shows it
    api.remove_products(cat, [first_sku])
    assert not shared.exists()
    assert all_blobs(cat) == referenced_blobs(cat)


def test_remove_images_frees_blob(built: dict[str, Any], cat: Path) -> None:
    sku = list(built["images"])[2]
    gone, kept = (blob_of(cat, p) for p in built["images"][sku])
    catalog = open_catalog(cat)
    try:
        product = catalog.store.find_product(sku)
        assert product is not None
        catalog.remove_images([catalog.store.images_of(product.id)[0].id])
    finally:
        catalog.close()
    assert not gone.exists() and kept.is_file()


def test_sync_frees_blob_of_image_no_longer_listed(
    built: dict[str, Any], cat: Path, tmp_path: Path, lite0_model_dir: Path
) -> None:
    sku = list(built["images"])[2]
    dropped = built["images"][sku][1]
    dropped_blob = blob_of(cat, dropped)
    rows = [line.split(",") for line in built["csv"].read_text().splitlines()[1:]]
    kept_rows: list[list[object]] = [r for r in rows if r[1] != str(dropped)]
    csv_path = write_csv(tmp_path / "fewer.csv", kept_rows)
    report = api.index_source(csv_path, cat, model=str(lite0_model_dir), sync=True, workers=0)
    assert report.removed == 1
    assert not dropped_blob.exists()
    assert all_blobs(cat) == referenced_blobs(cat)


def test_delete_never_touches_a_path_outside_the_blob_layout(tmp_path: Path) -> None:
    sha = "ab" + "0" * 62
    assert blobs.blob_file(tmp_path, f"blobs/ab/{sha}.jpg", sha) == tmp_path / f"blobs/ab/{sha}.jpg"
    for bad in (
        f"blobs/ab/../../{sha}.jpg",
        f"blobs/cd/{sha}.jpg",
        f"/etc/{sha}.jpg",
        f"blobs/ab/{'cd' + '0' * 62}.jpg",
        "blobs/ab/notes.txt",
        f"other/ab/{sha}.jpg",
    ):
        assert blobs.blob_file(tmp_path, bad, sha) is None, bad


# --- garbage collection ------------------------------------------------------------------------
def test_young_orphan_kept_old_one_removed(cat: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orphan = write_orphan(cat, seed=11)
    temp = write_stale_temp(cat)
    live = all_blobs(cat) - {orphan}
    report = gc(cat)  # both were written a moment ago: an ingest may be about to commit them
    assert orphan.is_file() and temp.is_file()
    assert (report.orphans_found, report.temp_files_found, report.young_files_kept) == (0, 0, 2)
    assert report.files_scanned == len(live) + 2

    real = time.time
    monkeypatch.setattr(blobs, "_now", lambda: real() + TWO_HOURS)
    assert gc(cat, min_age_seconds=3 * 3600).orphans_removed == 0  # a longer grace: still young
    assert orphan.is_file()
    report = gc(cat)
    assert not orphan.exists() and not temp.exists()
    assert all(p.is_file() for p in live)  # every referenced blob stays
    size = len(b"\xff\xd8 half a jpeg")
    assert (report.orphans_found, report.orphans_removed) == (1, 1)
    assert (report.temp_files_found, report.temp_files_removed) == (1, 1)
    assert report.bytes_freed == report.reclaimable_bytes > size
    assert report.missing_blobs == 0 and report.young_files_kept == 0
    assert gc(cat).orphans_found == 0  # nothing left


@pytest.mark.usefixtures("later")
def test_dry_run_removes_nothing(cat: Path) -> None:
    orphan, temp = write_orphan(cat, seed=12), write_stale_temp(cat)
    before = {p: p.stat().st_size for p in (cat / "blobs").glob("*/*")}
    report = gc(cat, dry_run=True)
    assert {p: p.stat().st_size for p in (cat / "blobs").glob("*/*")} == before
    assert report.dry_run
    assert (report.orphans_found, report.temp_files_found) == (1, 1)
    assert (report.orphans_removed, report.temp_files_removed, report.bytes_freed) == (0, 0, 0)
    assert report.reclaimable_bytes == orphan.stat().st_size + temp.stat().st_size


@pytest.mark.usefixtures("later")
def test_row_committed_after_the_scan_keeps_its_blob(
    cat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process commits a row for the orphan between GC's scan and its removals."""
    orphan = write_orphan(cat, seed=13)
    sha = orphan.name.split(".")[0]
    catalog = open_catalog(cat)
    real_lock = catalog.write_lock

    @contextmanager
    def lock_after_other_commit() -> Iterator[None]:
        other = CatalogStore(cat / "catalog.sqlite")  # the other writer, committing first
        try:
            with real_lock(), other.transaction() as db:
                product_id = other.upsert_product(db, "late-sku")
                other.insert_image(
                    db,
                    product_id,
                    source="late.jpg",
                    blob=str(orphan.relative_to(cat)),
                    sha256=sha,
                    width=48,
                    height=48,
                    vector=np.full(catalog.dim, 0.5, np.float32),
                )
        finally:
            other.close()
        with real_lock():
            yield

    monkeypatch.setattr(catalog, "write_lock", lock_after_other_commit)
    try:
        report = catalog.collect_garbage()
    finally:
        catalog.close()
    assert report.orphans_found == 1  # the scan saw no row...
    assert report.orphans_removed == 0  # ...but the re-check under the lock did
    assert orphan.is_file()
    assert gc(cat).orphans_found == 0


@pytest.mark.usefixtures("later")
def test_gc_waits_for_the_catalog_write_lock(cat: Path) -> None:
    orphan = write_orphan(cat, seed=14)
    reports: list[blobs.GcReport] = []
    with open(cat / "write.lock", "a+") as fh:  # another writer holds the lock
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: reports.append(gc(cat)))
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and orphan.is_file()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    worker.join(30)
    assert reports[0].orphans_removed == 1 and not orphan.exists()


@pytest.mark.usefixtures("later")
def test_referenced_blobs_are_kept_and_missing_ones_reported(cat: Path) -> None:
    live = all_blobs(cat)
    lost = sorted(live)[0]
    lost.unlink()
    report = gc(cat)
    assert (report.orphans_found, report.orphans_removed, report.missing_blobs) == (0, 0, 1)
    assert all(p.is_file() for p in live - {lost})


@pytest.mark.usefixtures("later")
def test_non_blob_files_and_symlinks_left_alone(cat: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    sha = "ef" + "1" * 62
    target = outside / f"{sha}.jpg"
    target.write_bytes(b"not the catalog's")
    (outside / "ef").mkdir()
    (outside / "ef" / f"{sha}.jpg").write_bytes(b"not the catalog's either")
    shard = cat / "blobs" / "ab"
    shard.mkdir(exist_ok=True)
    strays = [
        shard / "notes.txt",
        shard / f"{'cd' + '2' * 62}.jpg",  # a blob name in the wrong shard
        shard / f"{'AB' + '3' * 62}.jpg",  # not how ingest names blobs
        shard / "tmpnotours.tmp",
        cat / "blobs" / f"{'ab' + '4' * 62}.jpg",  # not in a shard
    ]
    for path in strays:
        path.write_bytes(b"keep me")
    link = shard / f"{'ab' + '5' * 62}.jpg"
    link.symlink_to(target)
    (cat / "blobs" / "ef").symlink_to(outside / "ef", target_is_directory=True)
    live = all_blobs(cat)

    report = gc(cat)
    assert report.files_scanned == len(referenced_blobs(cat))
    assert report.orphans_found == report.temp_files_found == 0
    assert all(p.read_bytes() == b"keep me" for p in strays)
    assert link.is_symlink() and target.is_file() and (outside / "ef" / f"{sha}.jpg").is_file()
    assert all(p.exists() for p in live)


def test_gc_after_crash_mid_ingest(
    built: dict[str, Any],
    cat: Path,
    tmp_path: Path,
    lite0_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blobs are written before their rows commit: an ingest that dies in between leaves them."""
    make_images(tmp_path / "new", n_products=2, per_product=1, size=64, seed=9)
    for folder in list((tmp_path / "new").iterdir()):
        folder.rename(tmp_path / "new" / f"new-{folder.name}")
    before = all_blobs(cat)

    def crash(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed before the commit")

    monkeypatch.setattr(CatalogStore, "insert_image", crash)
    with pytest.raises(SystemExit):
        api.index_source(tmp_path / "new", cat, model=str(lite0_model_dir), workers=0)
    monkeypatch.undo()
    leftovers = all_blobs(cat) - before
    assert len(leftovers) == 2
    temp = write_stale_temp(cat, shard=sorted(leftovers)[0].parent.name)
    assert check_catalog_dir(cat)["images"] == 7  # nothing committed

    assert gc(cat).young_files_kept == 3  # may still be an ingest about to commit: kept
    assert all(p.is_file() for p in leftovers)
    real = time.time
    monkeypatch.setattr(blobs, "_now", lambda: real() + TWO_HOURS)
    report = gc(cat)
    assert (report.orphans_removed, report.temp_files_removed) == (2, 1)
    assert not any(p.exists() for p in leftovers) and not temp.exists()
    assert all_blobs(cat) == before == referenced_blobs(cat)
    assert check_catalog_dir(cat)["images"] == 7


def test_grace_must_not_be_negative(cat: Path) -> None:
    with pytest.raises(ConfigError, match="grace"):
        api.collect_garbage(cat, grace_seconds=-1)
    with pytest.raises(ConfigError, match="grace"):
        api.collect_garbage(cat, grace_seconds=float("nan"))


def test_gc_on_catalog_without_blobs(tmp_path: Path) -> None:
    from snapshop.catalog.catalog import create_catalog

    catalog: Catalog = create_catalog(tmp_path / "empty", model_id="toy@0", model_ref="toy", dim=4)
    try:
        report = catalog.collect_garbage()
    finally:
        catalog.close()
    assert report.files_scanned == report.orphans_found == report.missing_blobs == 0


# --- CLI -----------------------------------------------------------------------------------------
def test_cli_gc(cat: Path) -> None:
    runner = CliRunner()
    orphan = write_orphan(cat, seed=15)
    size = orphan.stat().st_size
    live = all_blobs(cat) - {orphan}

    result = runner.invoke(app, ["catalog", "gc", "--catalog", str(cat), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would remove 0 unreferenced blobs" in result.stdout  # young: inside the grace
    assert "kept 1 unreferenced files younger than 3600 s" in result.stdout

    result = runner.invoke(
        app, ["catalog", "gc", "--catalog", str(cat), "--dry-run", "--grace", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["dry_run"], data["orphans_found"], data["reclaimable_bytes"]) == (True, 1, size)
    assert data["files_scanned"] == len(live) + 1
    assert orphan.is_file()

    result = runner.invoke(app, ["catalog", "gc", "--catalog", str(cat), "--grace", "0"])
    assert result.exit_code == 0, result.output
    assert "removed 1 of 1 unreferenced blobs and 0 of 0 temp files" in result.stdout
    assert not orphan.exists() and all(p.is_file() for p in live)

    result = runner.invoke(app, ["catalog", "gc", "--catalog", str(cat), "--grace", "-5"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["catalog", "gc", "--catalog", str(cat / "nope")])
    assert result.exit_code == 1 and "no catalog here" in result.stderr


def test_reusing_a_stored_blob_makes_it_young_again(tmp_path: Path) -> None:
    """An ingest that finds its bytes already stored touches the file, so a concurrent garbage
    collection (which spares young files) cannot take it before the ingest commits."""
    import os

    from snapshop.catalog.blobs import write_blob

    blob_dir = tmp_path / "blobs"
    data = b"\xff\xd8\xff\xe0" + b"0" * 64
    rel = write_blob(blob_dir, "ab" + "0" * 62, data)
    path = tmp_path / rel
    old = path.stat().st_mtime - 7200
    os.utime(path, (old, old))
    assert write_blob(blob_dir, "ab" + "0" * 62, data) == rel
    assert path.stat().st_mtime > old + 3600
    path.unlink()  # collected between two ingests: written again
    assert write_blob(blob_dir, "ab" + "0" * 62, data) == rel and path.read_bytes() == data


@pytest.mark.parametrize("workers", [0, 1])
def test_ingest_restores_a_blob_removed_by_a_concurrent_delete(
    tmp_path: Path, lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Another process deletes the last row sharing these bytes (freeing the file) after this
    ingest wrote or reused the blob and before it commits: the commit puts the file back, from
    memory (in-process decode) or by reading the source again (decode workers keep no copy).
    A source that changed meanwhile fails that one image with a clear reason, committing
    nothing that names a missing file."""
    images = make_images(tmp_path / "shop", n_products=3, per_product=2, size=48, seed=21)
    changed = images[next(iter(images))][0]
    real_lock = Catalog.write_lock
    raced: list[Path] = []

    @contextmanager
    def lock_after_a_concurrent_delete(self: Catalog) -> Iterator[None]:
        present = [p for p in (self.directory / "blobs").glob("*/*") if p.is_file()]
        if present and not raced:  # the first commit after blobs were written
            with real_lock(self):
                for path in present:  # what the other process's delete frees, under the lock
                    path.unlink()
                    raced.append(path)
                if workers:  # and the source is replaced before the re-read
                    render(demo_products(1, seed=99)[0], 99, size=48).save(changed)
        with real_lock(self):
            yield

    monkeypatch.setattr(Catalog, "write_lock", lock_after_a_concurrent_delete)
    manifest = shop_csv(tmp_path / "shop.csv", images)
    report = api.index_source(
        manifest, tmp_path / "cat", model=str(lite0_model_dir), workers=workers, batch_size=1
    )
    monkeypatch.undo()
    assert raced, "the simulated delete did not happen"
    referenced = referenced_blobs(tmp_path / "cat")
    assert referenced and all(p.is_file() for p in referenced)
    assert gc(tmp_path / "cat").missing_blobs == 0
    if workers:
        assert report.added == 5
        assert [(path, reason) for path, reason in report.failed] == [
            (
                str(changed),
                "stored copy removed by a concurrent delete and the source changed"
                " since it was read",
            )
        ]
    else:
        assert report.added == 6 and not report.failed


def test_thumbnails_of_deleted_images_are_collected(tmp_path: Path) -> None:
    """Cached thumbnails are keyed by sha256: those of images no row has any more go (without
    a grace period: they are rendered again on demand); the others and odd files stay."""
    from snapshop.catalog.blobs import LOCAL_FEATURES, THUMB_DIR, collect_garbage

    class Store:  # the two queries garbage collection asks; no blobs at all here
        def references_sha256(self, sha256: str) -> bool:
            return sha256.startswith("aa")

        def blob_refs_with_prefix(self, prefix: str) -> list[tuple[str, str | None]]:
            return []

    kept, stale = "aa" + "1" * 62, "bb" + "2" * 62
    files = {
        kept: tmp_path / THUMB_DIR / "256" / "aa" / f"{kept}.jpg",
        stale: tmp_path / THUMB_DIR / "256" / "bb" / f"{stale}.jpg",
    }
    # spatial verification's cached local features are swept the same way
    kept_features = LOCAL_FEATURES.file(tmp_path, 400, kept, "500")
    stale_features = LOCAL_FEATURES.file(tmp_path, 400, stale, "500")
    odd = tmp_path / THUMB_DIR / "256" / "bb" / "notes.txt"
    for path in [*files.values(), odd, kept_features, stale_features]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    lock = contextlib.nullcontext
    dry = collect_garbage(tmp_path, Store(), lock, dry_run=True)  # type: ignore[arg-type]
    assert (dry.stale_thumbnails, dry.thumbnails_removed) == (2, 0) and files[stale].exists()
    report = collect_garbage(tmp_path, Store(), lock)  # type: ignore[arg-type]
    assert (report.stale_thumbnails, report.thumbnails_removed) == (2, 2)
    assert files[kept].exists() and not files[stale].exists() and odd.exists()
    assert kept_features.exists() and not stale_features.exists()


def test_temp_names_are_made_and_recognised_in_one_place(tmp_path: Path) -> None:
    """GC recognises the temp files config.make_temp names (and those older versions left,
    which tempfile named the same way), and nothing else."""
    fd, made = config.make_temp(tmp_path)
    os.close(fd)
    assert made.parent == tmp_path and config.is_temp_name(made.name)
    assert config.is_temp_name("tmpab_c1234.tmp")  # as ingest's mkstemp named them before
    for other in ("tmpab_c1234.tmp.jpg", "notes.tmp", "tmpABCDEFGH.tmp", "x" + made.name):
        assert not config.is_temp_name(other), other


def test_atomic_file_leaves_no_temp_behind(tmp_path: Path) -> None:
    target = tmp_path / "shard" / "file.bin"
    with config.atomic_file(target) as fh:
        fh.write(b"whole")
    assert target.read_bytes() == b"whole"
    with pytest.raises(RuntimeError), config.atomic_file(target) as fh:
        fh.write(b"torn")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"whole"  # the old file, never a torn one
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_service_thumbnails_live_where_gc_looks(cat: Path) -> None:
    """The service's thumbnail cache locates its files through blobs.THUMBNAILS, so GC
    collects the thumbnails of a deleted product and keeps the others."""
    from snapshop.service.thumbs import thumbnail

    with open_catalog(cat) as catalog:
        owners: dict[str, set[int]] = {}
        for product in catalog.list_products(limit=1000):
            for image in catalog.images_of(product.id):
                owners.setdefault(image.sha256, set()).add(product.id)
        victim = next(
            p
            for p in catalog.list_products(limit=1000)
            if all(owners[im.sha256] == {p.id} for im in catalog.images_of(p.id))
        )
        doomed = catalog.images_of(victim.id)[0]
        kept = next(
            catalog.images_of(pid)[0]
            for pids in owners.values()
            for pid in pids
            if pid != victim.id
        )
        paths = [thumbnail(catalog, image, 64) for image in (doomed, kept)]
        assert paths == [blobs.THUMBNAILS.file(cat, 64, im.sha256) for im in (doomed, kept)]
        catalog.remove_product(victim.id)
        report = catalog.collect_garbage()
    assert report.thumbnails_removed == 1 and not paths[0].exists() and paths[1].exists()


def test_crop_thumbnails_of_deleted_images_are_collected(tmp_path: Path) -> None:
    """Crop thumbnails (named by the image's sha256 and the crop box) are a derived cache
    too: those of bytes no row holds go, the others stay."""

    class Store:
        def references_sha256(self, sha256: str) -> bool:
            return sha256.startswith("aa")

        def blob_refs_with_prefix(self, prefix: str) -> list[tuple[str, str | None]]:
            return []

    kept, stale = "aa" + "1" * 62, "bb" + "2" * 62
    crops = blobs.CROP_THUMBNAILS
    files = [crops.file(tmp_path, 128, sha, tag="0_0_40_60") for sha in (kept, stale)]
    assert files[0] == tmp_path / "thumbs" / "crops" / "128" / "aa" / f"{kept}-0_0_40_60.jpg"
    whole = blobs.THUMBNAILS.file(tmp_path, 128, kept)
    for path in [*files, whole]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    report = blobs.collect_garbage(tmp_path, Store(), contextlib.nullcontext)  # type: ignore[arg-type]
    assert (report.stale_thumbnails, report.thumbnails_removed) == (1, 1)
    assert files[0].exists() and not files[1].exists() and whole.exists()
    with pytest.raises(ValueError, match="tag"):
        crops.file(tmp_path, 128, kept, tag="../../x")
