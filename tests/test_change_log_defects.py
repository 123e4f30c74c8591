"""A sixth adversarial round (2026-12-07, night): the replica change log, ``catalog migrate``
reruns and ``--mirror``, and Ray ingest's handling of workers that die. Each test failed on
the code before its fix."""

from __future__ import annotations

import json
import pickle
import sqlite3
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_catalog_migrate import build_source
from test_change_log import DIM, MODEL_ID, assert_reader_matches, unit
from test_migrate_sync import _age, _content

from snapshop.catalog import migrate
from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.catalog.migrate import CATALOG_ID, migrate_catalog
from snapshop.catalog.store import NewCrop
from snapshop.errors import CatalogError, IngestError
from snapshop.ingest_ray import LOAD_DEATHS, BatchLedger, IndexActor


def card_of(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "catalog.json").read_text())


# --- crop positions name index files -------------------------------------------------------------
def test_a_crop_position_that_climbs_out_of_the_index_folder_cannot_overwrite_the_catalog_card(
    tmp_path: Path,
) -> None:
    """A crop position is stored as given and names its index file: a source catalog holding
    the position ``../../../catalog`` (written by other code, or crafted) migrated onto a copy
    wrote that index's card over the copy's catalog.json, which then no longer opened; any
    ``.faiss`` or ``.json`` file the user could write was as exposed. Such a position is now
    refused where crops are written; one a store holds already is indexed in memory only."""
    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    climbing = "../../../catalog"
    with sqlite3.connect(tmp_path / "src" / "catalog.sqlite") as db:  # as other code wrote it
        db.execute(
            "INSERT INTO crops(image_id, position, label, score, x1, y1, x2, y2, vector)"
            " SELECT id, ?, 'top', 0.5, 0, 0, 1, 1, vector FROM images LIMIT 1",
            (climbing,),
        )
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    card = (tmp_path / "dst" / "catalog.json").read_text()
    with pytest.raises(CatalogError, match=r"crop position '\.\./\.\./\.\./catalog'"):
        migrate_catalog(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "catalog.json").read_text() == card
    open_catalog(tmp_path / "dst").close()
    with open_catalog(tmp_path / "src") as source:  # its store holds one: kept in memory only
        assert len(source.indexes[f"crops-{climbing}"]) == 1
        source.save_indexes()
    assert (tmp_path / "src" / "catalog.json").exists() and card_of(tmp_path / "src")["dim"]
    assert not list(tmp_path.rglob("catalog.faiss"))


def test_a_sha256_that_climbs_out_of_the_catalog_names_no_cache_file(tmp_path: Path) -> None:
    """The thumbnail cache named its files after a row's sha256 unchecked: a row holding a
    real blob and the sha256 ``../../../../escaped`` (written by other code) had its thumbnail
    written outside the catalog. Such a sha256 now names no cache file (a 404 for the service,
    features kept in memory for verification), and writes refuse it."""
    from snapshop.errors import FieldError, NotFoundError
    from snapshop.service.thumbs import thumbnail

    build_source(tmp_path / "catalog").close()
    climbing = "../../../../escaped"
    with sqlite3.connect(tmp_path / "catalog" / "catalog.sqlite") as db:  # as other code wrote it
        (image_id,) = db.execute("SELECT MIN(id) FROM images").fetchone()
        db.execute("UPDATE images SET sha256 = ? WHERE id = ?", (climbing, image_id))
    with open_catalog(tmp_path / "catalog") as catalog:
        image = catalog.store.get_image(image_id)
        assert image.sha256 == climbing
        with pytest.raises(NotFoundError, match="not a sha256"):
            thumbnail(catalog, image, 64)
        vector = np.full(catalog.dim, catalog.dim**-0.5, np.float32)
        with pytest.raises(FieldError, match="64 lowercase hex digits"), catalog.writing() as write:
            product = write.upsert_product("sku-new")
            write.insert_image(product, source="x.jpg", blob=None, sha256=climbing,
                               width=1, height=1, vector=vector)  # fmt: skip
    assert not list(tmp_path.rglob("escaped*"))
    with pytest.raises(CatalogError, match="cannot be copied"):
        migrate_catalog(tmp_path / "catalog", tmp_path / "copy")


# --- the writer's own indexes ------------------------------------------------------------------
def test_an_image_inserted_and_deleted_in_one_write_leaves_no_entry_in_the_writers_indexes(
    tmp_path: Path,
) -> None:
    """The write's removals were applied before its additions: the image (and its crop) came
    back into the indexes, which were marked current, so no refresh took them out; the
    save then measured a vector the store no longer had (a raw ValueError)."""
    catalog = create_catalog(tmp_path / "catalog", model_id=MODEL_ID, model_ref="toy", dim=DIM)
    rng = np.random.default_rng(0)
    try:
        with catalog.writing() as write:
            product = write.upsert_product("short-lived")
            image_id, _ = write.insert_image(
                product, source="x.jpg", blob=None, sha256="ab" * 32, width=4, height=4,
                vector=unit(rng), crops=[NewCrop("upper", "top", 0.9, (0, 0, 2, 2), unit(rng))],
            )  # fmt: skip
            write.delete_images([image_id])
        assert catalog.refresh() is False  # current, by the write's own bookkeeping
        assert_reader_matches(catalog, catalog.store)
        catalog.save_indexes()
    finally:
        catalog.close()


# --- catalog migrate ------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["page images", "page crops", "check"])
def test_an_image_the_live_source_deletes_while_migrate_reads_it_is_left_out_not_a_key_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A page of the source is read in a few queries (images, crops, then their vectors), and
    the check's sample too, not in one snapshot: an image another process deleted between
    them (a live catalog, which migrate reruns keep copying) had no vector, and the copy died
    on a raw KeyError."""
    build_source(tmp_path / "src").close()
    read_vectors, check = migrate._vectors, migrate._check
    checking, deleted = [], []

    def deleted_meanwhile(catalog: Any, table: str, ids: list[int]) -> Any:
        wanted = "crops" if when == "page crops" else "images"
        at_check = bool(checking) == (when == "check")
        source = not catalog.is_server and catalog.directory == tmp_path / "src"
        if table == wanted and at_check and ids and not deleted and source:
            image_id = ids[0] if table == "images" else catalog.get_crop(ids[0]).image_id
            with open_catalog(tmp_path / "src") as writer:  # another process's write
                writer.remove_images([image_id])
            deleted.append(image_id)
        return read_vectors(catalog, table, ids)

    def checked(*args: Any, **kwargs: Any) -> Any:
        checking.append(True)
        return check(*args, **kwargs)

    monkeypatch.setattr(migrate, "_vectors", deleted_meanwhile)
    monkeypatch.setattr(migrate, "_check", checked)
    report = migrate_catalog(tmp_path / "src", tmp_path / "dst")
    assert deleted and report.images_copied == (10 if when == "check" else 9)
    monkeypatch.setattr(migrate, "_vectors", read_vectors)
    again = migrate_catalog(tmp_path / "src", tmp_path / "dst", mirror=True)
    assert (again.images_copied, again.images_present) == (0, 9)


def test_two_migrates_of_one_source_started_together_give_their_copies_one_catalog_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run gave the source an id of its own from the card it read at open, the last one
    written won: the other copy carried an id the source no longer had, and once it took a
    write of its own every later rerun refused it as "another catalog" (--mirror too)."""
    build_source(tmp_path / "src").close()
    both_opened = threading.Barrier(2, timeout=30)
    real_open = migrate.open_catalog

    def open_then_wait_for_the_other(target: Any, **kwargs: Any) -> Any:
        catalog = real_open(target, **kwargs)
        if Path(target) == tmp_path / "src":  # both have read the source's card
            both_opened.wait()
        return catalog

    monkeypatch.setattr(migrate, "open_catalog", open_then_wait_for_the_other)
    errors: list[BaseException] = []

    def copy_to(name: str) -> None:
        try:
            migrate_catalog(tmp_path / "src", tmp_path / name)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=copy_to, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    source_id = card_of(tmp_path / "src")[CATALOG_ID]
    assert card_of(tmp_path / "a")[CATALOG_ID] == card_of(tmp_path / "b")[CATALOG_ID] == source_id
    monkeypatch.setattr(migrate, "open_catalog", real_open)
    for name in ("a", "b"):
        with open_catalog(tmp_path / name) as copy, copy.writing() as write:
            write.upsert_product(f"{name}-own", title="written to the copy alone")
        report = migrate_catalog(tmp_path / "src", tmp_path / name)
        assert report.products_not_in_source == 1


def test_a_mirror_whose_product_another_rerun_removed_first_does_not_fail_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``--mirror`` reruns at once (a cron overlap): each listed the products the source
    lacks, then removed them; the one that came second failed with "no product with id 2"
    on a product the other had just removed, after the target was already equal."""
    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with open_catalog(tmp_path / "src") as src:
        _age(src)  # sku-1 goes
        expected = _content(src)
    lookup, removed = migrate.lookup_sku, []

    def removed_by_the_other_rerun(sku: object) -> str:
        if sku == "sku-1" and not removed:  # listed as not in the source, not removed yet
            with open_catalog(tmp_path / "dst") as other:
                product = other.find_product("sku-1")
                assert product is not None
                other.remove_product(product.id)
            removed.append(sku)
        return lookup(sku)

    monkeypatch.setattr(migrate, "lookup_sku", removed_by_the_other_rerun)
    report = migrate_catalog(tmp_path / "src", tmp_path / "dst", mirror=True)
    assert removed and report.products_not_in_source == 0  # the other run removed it
    with open_catalog(tmp_path / "dst") as dst:
        assert _content(dst) == expected


@pytest.mark.parametrize("damaged", [42, "", None, ["x"]])
def test_a_damaged_catalog_id_in_the_source_card_is_refused_not_replaced(
    tmp_path: Path, damaged: object
) -> None:
    """A source card whose catalog_id was not text (a hand edit, a tool that read the hex id
    as a number) was given a new id silently: every copy made before lost its identity (a
    copy with writes of its own was then "another catalog"), and the damage was covered up."""
    build_source(tmp_path / "src").close()
    migrate_catalog(tmp_path / "src", tmp_path / "dst")
    card = card_of(tmp_path / "src")
    card[CATALOG_ID] = damaged
    (tmp_path / "src" / "catalog.json").write_text(json.dumps(card))
    with pytest.raises(CatalogError, match=r"catalog\.json: catalog_id .* is not"):
        migrate_catalog(tmp_path / "src", tmp_path / "dst")
    with pytest.raises(CatalogError, match="catalog_id"):
        migrate_catalog(tmp_path / "src", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert card_of(tmp_path / "src")[CATALOG_ID] == damaged  # left for the user to restore


# --- Ray ingest: workers that die ---------------------------------------------------------------
def test_workers_that_died_loading_now_and_then_do_not_stop_an_ingest_whose_loads_succeed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger counted every load that ever died: after the third, spread over a long
    ingest (a node short of memory for a moment, each time followed by a load that worked),
    the next actor a killer image made Ray restart refused to start, and the ingest ended
    with "at least 3 Ray workers died while loading" though loading worked. Deaths in a row
    are what say that the next load will die too."""
    ledger = BatchLedger()
    handle = SimpleNamespace(  # the ledger as an actor handle, its calls answered at once
        begin_load=SimpleNamespace(remote=ledger.begin_load),
        end_load=SimpleNamespace(remote=ledger.end_load),
    )
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(get=lambda x: x, cloudpickle=pickle))
    monkeypatch.setattr(IndexActor, "_load", lambda self, **arguments: None)
    packed = pickle.dumps({})
    for _ in range(LOAD_DEATHS + 1):
        ledger.begin_load()  # a worker that died while it loaded
        IndexActor(packed, handle, bisection=0, pool=1)  # the one Ray started next loads
    for _ in range(LOAD_DEATHS):  # in a row, as a model too large for the workers
        ledger.begin_load()
    with pytest.raises(IngestError, match="at least 3 Ray workers died while loading"):
        IndexActor(packed, handle, bisection=0, pool=1)
