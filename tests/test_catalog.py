"""Catalog directory mechanics: create/open, index recovery, reconciliation, ids, locking."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import assert_consistent, make_images

from snapshop import api
from snapshop.catalog.catalog import Catalog, create_catalog, open_catalog
from snapshop.catalog.store import NewCrop
from snapshop.config import read_json, write_json
from snapshop.errors import CatalogError, ModelError

DIM = 8


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def new_catalog(directory: Path, index_kind: str = "flat") -> Catalog:
    return create_catalog(
        directory, model_id="toy@000000000000", model_ref="toy", dim=DIM, index_kind=index_kind
    )


def add_image(
    catalog: Catalog,
    sku: str,
    rng: np.random.Generator,
    crops: tuple[str, ...] = (),
    save: bool = True,
) -> tuple[int, list[int]]:
    """Insert one image (and crops at ``crops`` positions) the way ingest does."""
    vec = unit(rng)[0]
    new = [NewCrop(pos, "top", 0.9, (0, 0, 4, 4), unit(rng)[0]) for pos in crops]
    store = catalog.store
    with catalog.write_lock(), store.transaction() as db:
        product_id = store.upsert_product(db, sku, title=sku.upper())
        sha = f"{rng.integers(1 << 62):064x}"
        image_id, crop_ids = store.insert_image(
            db,
            product_id,
            source=f"{sku}.jpg",
            blob=None,
            sha256=sha,
            width=4,
            height=4,
            vector=vec,
            crops=new,
        )
    committed = store.last_commit()
    catalog.add_vectors(None, np.array([image_id]), vec[None, :])
    for cid, c in zip(crop_ids, new, strict=True):
        catalog.add_vectors(c.position, np.array([cid]), c.vector[None, :])
    catalog.applied(committed)
    if save:
        with catalog.write_lock():
            catalog.save_indexes()
    return image_id, crop_ids


@pytest.fixture()
def filled(tmp_path: Path) -> Path:
    """A toy catalog: 5 products x 3 images, the first image of each with an upper crop."""
    rng = np.random.default_rng(0)
    catalog = new_catalog(tmp_path / "cat")
    try:
        for p in range(5):
            for j in range(3):
                add_image(catalog, f"p{p}", rng, crops=("upper",) if j == 0 else (), save=False)
        with catalog.write_lock():
            catalog.save_indexes()
        assert_consistent(catalog)
    finally:
        catalog.close()
    return tmp_path / "cat"


def reopened(directory: Path) -> Catalog:
    catalog = open_catalog(directory)
    assert_consistent(catalog)
    return catalog


def test_create_and_open(filled: Path) -> None:
    catalog = reopened(filled)
    try:
        info = catalog.info()
        assert (info["products"], info["images"], info["crops"]) == (5, 15, 5)
        assert info["indexes"] == {"crops-upper": 5, "images": 15}
        assert catalog.model_id == "toy@000000000000" and catalog.dim == DIM
        assert (filled / "catalog.json").is_file() and (filled / "catalog.sqlite").is_file()
        assert (filled / "index" / "images.faiss").is_file()
    finally:
        catalog.close()


def test_open_errors(tmp_path: Path, filled: Path) -> None:
    with pytest.raises(CatalogError, match="no catalog here"):
        open_catalog(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "catalog.json").write_text("{oops")
    with pytest.raises(CatalogError, match="unreadable catalog card"):
        open_catalog(broken)
    (broken / "catalog.json").write_text('{"model_id": "x"}')
    with pytest.raises(CatalogError, match="missing"):
        open_catalog(broken)
    (filled / "catalog.sqlite").rename(tmp_path / "moved.sqlite")
    with pytest.raises(CatalogError, match="database is missing"):
        open_catalog(filled)
    assert not (filled / "catalog.sqlite").exists()  # not silently recreated empty


def test_zero_byte_database_is_not_a_new_empty_catalog(filled: Path) -> None:
    """SQLite would take a 0-byte file (a failed copy) for a new database: the catalog would
    open empty and its next index save would drop every vector."""
    for suffix in ("-wal", "-shm"):
        (filled / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    (filled / "catalog.sqlite").write_bytes(b"")
    index_bytes = (filled / "index" / "images.faiss").read_bytes()
    with pytest.raises(CatalogError, match="empty"):
        open_catalog(filled)
    assert (filled / "index" / "images.faiss").read_bytes() == index_bytes


@pytest.mark.parametrize("dim", ["8", 0, 4])
def test_card_dim_that_does_not_fit_the_store(filled: Path, dim: object) -> None:
    card = read_json(filled / "catalog.json")
    write_json(filled / "catalog.json", {**card, "dim": dim})
    with pytest.raises(CatalogError, match="dim"):
        open_catalog(filled).close()


def test_ids_beyond_sqlite_integers_name_nothing(filled: Path) -> None:
    catalog = open_catalog(filled)
    try:
        huge = 10**30
        for lookup in (catalog.store.get_product, catalog.store.get_image, catalog.remove_product):
            with pytest.raises(CatalogError, match=f"no (product|image) with id {huge}"):
                lookup(huge)
        assert catalog.store.list_products(after_id=huge) == []
        assert catalog.store.counts()["products"] == 5
    finally:
        catalog.close()


def test_not_a_database(filled: Path) -> None:
    for suffix in ("-wal", "-shm"):
        (filled / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    (filled / "catalog.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="not a usable catalog database"):
        open_catalog(filled)


def test_create_refuses_existing_or_foreign_directory(tmp_path: Path, filled: Path) -> None:
    with pytest.raises(CatalogError, match="already exists"):
        new_catalog(filled)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(CatalogError, match="not empty"):
        new_catalog(tmp_path / "photos")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["holiday.jpg"]  # no lock file
    (tmp_path / "file").write_text("x")
    with pytest.raises(CatalogError, match="not a directory"):
        new_catalog(tmp_path / "file")


@pytest.mark.parametrize("damage", ["deleted", "garbage", "truncated", "card_deleted", "empty"])
def test_damaged_index_rebuilt_from_store(filled: Path, damage: str) -> None:
    index_file = filled / "index" / "images.faiss"
    data = index_file.read_bytes()
    if damage == "deleted":
        index_file.unlink()
    elif damage == "garbage":
        index_file.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        index_file.write_bytes(data[: len(data) // 3])
    elif damage == "empty":
        index_file.write_bytes(b"")
    else:
        (filled / "index" / "images.json").unlink()
    catalog = reopened(filled)  # consistent, no exception
    try:
        assert len(catalog.index(None)) == 15
        with catalog.write_lock():
            catalog.save_indexes()
    finally:
        catalog.close()
    assert (filled / "index" / "images.faiss").stat().st_size > 15 * DIM * 4
    reopened(filled).close()


def test_stale_index_file_reconciled_on_open(filled: Path, tmp_path: Path) -> None:
    """An index saved before later writes (a crash before the save) is brought up to date."""
    old = (filled / "index" / "images.faiss").read_bytes()
    old_card = (filled / "index" / "images.json").read_bytes()
    rng = np.random.default_rng(1)
    catalog = open_catalog(filled)
    try:
        new_id, _ = add_image(catalog, "p9", rng)
        catalog.remove_product(catalog.store.find_product("p0").id)  # type: ignore[union-attr]
    finally:
        catalog.close()
    (filled / "index" / "images.faiss").write_bytes(old)  # as if neither save happened
    (filled / "index" / "images.json").write_bytes(old_card)
    catalog = reopened(filled)
    try:
        ids = set(catalog.index(None).ids().tolist())
        assert new_id in ids and len(ids) == 13
    finally:
        catalog.close()


def test_ids_are_never_reused(filled: Path) -> None:
    rng = np.random.default_rng(2)
    catalog = open_catalog(filled)
    try:
        last = catalog.store.find_product("p4")
        assert last is not None
        old_ids = [im.id for im in catalog.store.images_of(last.id)]
        old_crops = catalog.store.crop_ids("upper").max()
        catalog.remove_product(last.id)  # removes the highest ids
        image_id, crop_ids = add_image(catalog, "p5", rng, crops=("upper",))
        assert image_id > max(old_ids) and crop_ids[0] > old_crops
        assert catalog.store.find_product("p5").id > last.id  # type: ignore[union-attr]
    finally:
        catalog.close()


def test_other_writer_seen_on_refresh_including_removed_crop_position(filled: Path) -> None:
    reader = open_catalog(filled)
    writer = open_catalog(filled)
    try:
        assert len(reader.index("upper")) == 5
        rng = np.random.default_rng(3)
        add_image(writer, "p7", rng, crops=("lower",))
        for p in range(5):  # every product with an upper crop goes
            writer.remove_product(writer.store.find_product(f"p{p}").id)  # type: ignore[union-attr]
        assert reader.refresh() is True
        assert len(reader.index("upper")) == 0  # position gone: its index is emptied
        assert len(reader.index("lower")) == 1
        assert len(reader.index(None)) == 1
        assert reader.refresh() is False  # nothing new
        assert_consistent(reader)
    finally:
        reader.close()
        writer.close()
    catalog = reopened(filled)
    try:
        assert catalog.store.crop_positions() == ["lower"]
        # the position comes back later: the stale file on disk must not resurrect old crops
        image_id, crop_ids = add_image(catalog, "p8", np.random.default_rng(4), crops=("upper",))
    finally:
        catalog.close()
    catalog = reopened(filled)
    try:
        assert catalog.index("upper").ids().tolist() == crop_ids
    finally:
        catalog.close()


def test_remove_images_and_crops(filled: Path) -> None:
    catalog = open_catalog(filled)
    try:
        product = catalog.store.find_product("p1")
        images = catalog.store.images_of(product.id)  # type: ignore[union-attr]
        crops = catalog.store.crops_of_image(images[0].id)
        assert len(crops) == 1
        catalog.remove_images([images[0].id])
        assert crops[0].id not in catalog.index("upper").ids()
        assert images[0].id not in catalog.index(None).ids()
        assert_consistent(catalog)
        with pytest.raises(CatalogError):
            catalog.remove_product(10_000)
    finally:
        catalog.close()


def test_check_model(filled: Path) -> None:
    catalog = open_catalog(filled)
    try:
        catalog.check_model("toy@000000000000")
        with pytest.raises(ModelError, match="built with model toy@000000000000"):
            catalog.check_model("efficientnet_lite0@123456789abc")
    finally:
        catalog.close()


def test_write_lock_is_reentrant(filled: Path) -> None:
    catalog = open_catalog(filled)
    done = threading.Event()

    def nested() -> None:
        with catalog.write_lock(), catalog.write_lock():
            catalog.remove_images([])
        done.set()

    try:
        thread = threading.Thread(target=nested, daemon=True)
        thread.start()
        thread.join(10)
        assert done.is_set(), "nested write_lock deadlocked"
    finally:
        catalog.close()


def test_write_lock_excludes_other_processes(filled: Path) -> None:
    """flock: a second handle cannot take the lock while the catalog holds it."""
    import fcntl

    catalog = open_catalog(filled)
    try:
        with (
            catalog.write_lock(),
            open(filled / "write.lock", "a+") as fh,
            pytest.raises(BlockingIOError),
        ):
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(filled / "write.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        catalog.close()


def test_threads_ingesting_into_one_catalog(tmp_path: Path, lite0_model_dir: Path) -> None:
    """Two threads ingest different products into one new catalog at once."""
    make_images(tmp_path / "a", n_products=2, per_product=2, size=64, seed=5)
    make_images(tmp_path / "b", n_products=2, per_product=2, size=64, seed=6)
    for folder in list((tmp_path / "b").iterdir()):
        folder.rename(tmp_path / "b" / f"b-{folder.name}")
    errors: list[BaseException] = []

    def work(source: str) -> None:
        try:
            api.index_source(
                tmp_path / source,
                tmp_path / "cat",
                model=str(lite0_model_dir),
                batch_size=1,
                workers=0,
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    catalog = reopened(tmp_path / "cat")
    try:
        assert catalog.store.counts() == {"products": 4, "images": 8, "crops": 0}
    finally:
        catalog.close()


def test_store_products(filled: Path) -> None:
    catalog = open_catalog(filled)
    try:
        store = catalog.store
        p = store.find_product("p2")
        assert p is not None and p.title == "P2"
        updated = store.update_product(p.id, price=12.5, attributes={"colour": "red"})
        assert (updated.price, updated.title, updated.attributes) == (12.5, "P2", {"colour": "red"})
        updated = store.update_product(p.id, attributes={"size": "M"})
        assert updated.attributes == {"colour": "red", "size": "M"}  # merged
        assert [x.sku for x in store.list_products(limit=2)] == ["p0", "p1"]
        assert [x.sku for x in store.list_products(after_id=p.id)] == ["p3", "p4"]
        with pytest.raises(CatalogError):
            store.get_product(9999)
        with pytest.raises(CatalogError), store.transaction() as db:
            store.upsert_product(db, "  ")
        assert store.find_product("  ") is None
        assert store.update_product(p.id, url=" https://shop.example/p2 ").url == (
            "https://shop.example/p2"
        )
        for url in (
            "javascript:alert(1)",
            "JavaScript://x/%0aalert(1)",
            "data:text/html,x",
            "/p2",
            "https://",
            "https://shop.example/a b",
        ):
            with pytest.raises(CatalogError, match="url"):
                store.update_product(p.id, url=url)
        assert store.get_product(p.id).url == "https://shop.example/p2"  # the bad ones: no write
        assert store.update_product(p.id, url="").url == ""  # clears the link
        with pytest.raises(CatalogError, match="control"), store.transaction() as db:
            store.upsert_product(db, "p\x007")
        with pytest.raises(CatalogError, match="plain JSON"):
            store.update_product(p.id, attributes={"weight": float("nan")})
        assert store.get_product(p.id).attributes == {"colour": "red", "size": "M"}
    finally:
        catalog.close()


def test_opening_is_not_a_write(filled: Path) -> None:
    """Opening (or searching) must not bump the generation: every open reader would rescan."""
    catalog = open_catalog(filled)
    try:
        generation = catalog.store.generation
        for _ in range(3):
            open_catalog(filled).close()
        assert catalog.store.generation == generation
        assert catalog.refresh() is False
        add_image(catalog, "p6", np.random.default_rng(5))
        assert catalog.store.generation > generation
    finally:
        catalog.close()


def test_own_writes_need_no_rescan(filled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving after this process's own writes does not reconcile with the store (a rescan
    costly at 1M ids); a write by another connection in between does."""
    catalog = open_catalog(filled)
    other = open_catalog(filled)
    calls: list[str] = []
    original = Catalog._apply

    def counting(self: Catalog, name: str, added: np.ndarray, removed: np.ndarray) -> None:
        calls.append(name)
        original(self, name, added, removed)

    try:
        monkeypatch.setattr(Catalog, "_apply", counting)
        rng = np.random.default_rng(6)
        add_image(catalog, "p7", rng, crops=("upper",))
        catalog.remove_product(catalog.store.find_product("p0").id)  # type: ignore[union-attr]
        catalog.remove_images([])
        assert calls == []
        assert_consistent(catalog)
        add_image(other, "p8", rng)  # another writer
        add_image(catalog, "p9", rng)  # our save must now reconcile: other's image included
        assert "images" in calls
        assert_consistent(catalog)
    finally:
        catalog.close()
        other.close()
