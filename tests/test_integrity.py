"""``snapshop catalog check``: what a catalog derives from its store (index files, product
vectors, blob files), read in full and compared with the store; each kind of damage the
cheap checks on open let through is found, named, and given its repair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shop_helpers import DIM, add_image, fill_shop, new_catalog, stored_file
from typer.testing import CliRunner

from snapshop import api
from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.catalog.store import NewCrop
from snapshop.cli import app
from snapshop.index.reranked import vectors_fingerprint
from snapshop.integrity import check_catalog


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shop(directory: Path, index_kind: str = "flat", **params: object) -> None:
    if params:
        catalog = create_catalog(directory, model_id="toy@000000000000", model_ref="toy",
                                 dim=DIM, index_kind=index_kind, index_params=params)  # fmt: skip
    else:
        catalog = new_catalog(directory, index_kind=index_kind)
    try:
        fill_shop(catalog, n_products=12)
    finally:
        catalog.close()


def test_a_sound_catalog_has_no_problem(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, n_products=12)
        for n in range(3):  # with blob files, as an ingest stores them
            blob, sha = stored_file(directory, Image.new("RGB", (8, 8), (40 * n, 9, 9)))
            add_image(catalog, f"b{n}", unit_vectors(1, seed=n)[0], sha256=sha, blob=blob)
        report = check_catalog(catalog)
    finally:
        catalog.close()
    assert report.ok, report.problems
    assert report.checked["blobs read"] == 3
    assert (
        report.checked["image vectors"]
        == report.checked["index entries compared"] - (report.checked["crop vectors"])
    )
    assert set(report.self_recall) == {"images", "crops-upper", "crops-lower"}
    assert min(report.self_recall.values()) == 1.0
    assert report.notes == []


def test_a_flat_file_damaged_under_a_card_without_checksum_is_found(tmp_path: Path) -> None:
    # A card saved before cards held a CRC-32 is believed on open: the damage is served.
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    vectors = unit_vectors(6)
    try:
        for n, v in enumerate(vectors):
            add_image(catalog, f"p{n}", v)
    finally:
        catalog.close()
    card = directory / "index" / "images.json"
    saved = json.loads(card.read_text())
    del saved["file_crc32"]
    card.write_text(json.dumps(saved))
    data = (directory / "index" / "images.faiss").read_bytes()
    (directory / "index" / "images.faiss").write_bytes(
        data.replace(vectors[2].tobytes(), (-vectors[2]).tobytes())
    )
    report = api.check_catalog(directory)
    [problem] = [p for p in report.problems if p.what == "index"]
    assert problem.where == "images.faiss"
    assert "holds other vectors than the store for 1 of 6 entries (e.g. 3)" in problem.detail
    assert problem.fix.startswith("snapshop catalog reindex -c ")


@pytest.mark.parametrize(
    "kind,params",
    [("hnsw_sq", {"train_min": 50}), ("ivfpq", {"train_min": 50, "nlist": 4, "pq_m": 8})],
)
def test_a_compressed_index_float_vector_outside_the_fingerprint_is_found(
    tmp_path: Path, kind: str, params: dict[str, int]
) -> None:
    # Opening checks a fingerprint of 256 rows spread over `.vectors.npy`: a damaged row
    # between them loaded, and re-ranked its entry with the wrong vector.
    directory = tmp_path / "cat"
    catalog = create_catalog(directory, model_id="toy@000000000000", model_ref="toy", dim=DIM,
                             index_kind=kind, index_params=params)  # fmt: skip
    vectors = unit_vectors(600)
    try:
        with catalog.write_lock(), catalog.store.transaction() as db:
            ids = []
            for n, v in enumerate(vectors):
                product = catalog.store.upsert_product(db, f"p{n // 3}")
                image_id, _ = catalog.store.insert_image(
                    db, product, source=f"{n}.jpg", blob=None, sha256=f"{n:064x}", width=9,
                    height=9, vector=v, crops=[],
                )  # fmt: skip
                ids.append(image_id)
        catalog.applied(catalog.store.last_commit())
        catalog.add_vectors(None, np.array(ids), vectors)
        with catalog.write_lock():
            catalog.save_indexes()
    finally:
        catalog.close()
    floats_path = directory / "index" / "images.vectors.npy"
    floats = np.load(floats_path, mmap_mode="r+")
    before = vectors_fingerprint(floats)
    sampled = set(np.linspace(0, len(floats) - 1, 256).astype(np.int64).tolist())
    row = next(r for r in range(len(floats)) if r not in sampled)
    floats[row] = -floats[row]
    floats.flush()
    del floats
    assert vectors_fingerprint(np.load(floats_path, mmap_mode="r")) == before  # opens
    report = api.check_catalog(directory, sample=0)
    [problem] = report.problems
    assert (problem.what, problem.where) == ("index", "images.faiss")
    assert "holds other vectors than the store for 1 of 600 entries" in problem.detail


def test_missing_and_damaged_blobs_are_found_unless_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        files = []
        for n in range(3):
            blob, sha = stored_file(directory, Image.new("RGB", (8, 8), (40 * n, 9, 9)))
            add_image(catalog, f"b{n}", unit_vectors(1, seed=n)[0], sha256=sha, blob=blob)
            files.append(directory / blob)
    finally:
        catalog.close()
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:-10] + b"0123456789")
    report = api.check_catalog(directory)
    details = sorted(p.detail for p in report.problems)
    assert details[0].startswith("1 blob files do not hold the bytes their name says")
    assert details[1].startswith("1 blob files that images name are missing")
    assert {p.what for p in report.problems} == {"blob"}
    assert api.check_catalog(directory, blobs=False).ok


def test_a_damaged_product_vector_cache_is_found(tmp_path: Path) -> None:
    # The cache is reconciled with the store by ids: a vector changed in it was believed.
    directory = tmp_path / "cat"
    shop(directory)
    with open_catalog(directory) as catalog:
        from snapshop.product_vectors import ProductVectors

        ProductVectors(catalog)  # writes the cache
    cache = directory / "index" / "products.npz"
    with np.load(cache, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    key = next(k for k in arrays if k.endswith("vectors") and arrays[k].ndim == 2)
    arrays[key][0] = -arrays[key][0]
    np.savez(cache, **arrays)
    report = api.check_catalog(directory, blobs=False)
    assert [p.what for p in report.problems] == ["product-vectors"]
    assert "1 product vectors are not the mean of their entries" in report.problems[0].detail
    assert "products.npz" in report.problems[0].fix


def test_an_index_file_behind_the_store_is_a_note_not_a_problem(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    shop(directory)
    with open_catalog(directory) as catalog:
        v = unit_vectors(1, seed=9)[0]
        with catalog.write_lock(), catalog.store.transaction() as db:  # committed, not saved
            product = catalog.store.upsert_product(db, "late")
            crop = NewCrop("upper", "x", 0.9, (0, 0, 5, 5), v)
            catalog.store.insert_image(db, product, source="late.jpg", blob=None,
                                       sha256="f" * 64, width=9, height=9, vector=v,
                                       crops=[crop])  # fmt: skip
        report = check_catalog(catalog, blobs=False)
    assert report.ok, report.problems
    assert any("images.faiss: 1 of the store's entries are not in the saved file" in note
               for note in report.notes)  # fmt: skip


def test_the_cli_exits_1_on_a_problem_and_prints_its_repair(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    shop(directory)
    runner = CliRunner()
    result = runner.invoke(app, ["catalog", "check", "-c", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    (directory / "index" / "images.faiss").write_bytes(b"not an index")
    result = runner.invoke(app, ["catalog", "check", "-c", str(directory)])
    assert result.exit_code == 1, result.output
    assert "problem: index images.faiss" in result.output
    assert "fix: snapshop catalog reindex -c" in result.output
    result = runner.invoke(app, ["catalog", "check", "-c", str(directory), "--sample", "-1"])
    assert result.exit_code == 2


@pytest.mark.server
def test_a_server_catalog_is_checked_without_index_files_or_blobs(pg_database: str) -> None:
    catalog = create_catalog(pg_database, model_id="toy@000000000000", model_ref="toy", dim=DIM)
    try:
        fill_shop(catalog, n_products=6)
        report = check_catalog(catalog)
    finally:
        catalog.close()
    assert report.ok, report.problems
    assert "index entries compared" not in report.checked
    assert report.self_recall["images"] == 1.0
    assert report.notes == ["blobs: a server catalog keeps thumbnails only; not checked"]


def test_the_check_benchmark_times_each_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from script_helpers import load_script

    benchmark = load_script("benchmarks/catalog_check.py")
    assert benchmark.main(["--n", "300", "--dim", "16", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in (
        "product vectors, reconciled",
        "index file of images",
        "self-recall of crops-upper",
    ):
        assert f"| {stage} |" in out
    assert "problems: 0" in out and not list(tmp_path.iterdir())


def test_a_non_finite_stored_vector_is_left_out_on_open_and_reported(tmp_path: Path) -> None:
    # Written by plain SQL (insert refuses one): opening the catalog without its index files
    # raised "vectors contain NaN or infinity", and so did the check meant to report it; with
    # the files, the check also called the row "removed since" and blamed the product cache.
    import shutil
    import sqlite3

    directory = tmp_path / "cat"
    shop(directory)
    db = sqlite3.connect(directory / "catalog.sqlite")
    db.execute(
        "UPDATE images SET vector = ? WHERE id = 1", (np.full(DIM, np.nan, np.float32).tobytes(),)
    )
    db.commit()
    db.close()
    for files in ("saved", "removed"):
        if files == "removed":
            shutil.rmtree(directory / "index")
        report = api.check_catalog(directory, blobs=False)
        [problem] = report.problems
        assert (problem.what, problem.where) == ("vectors", "images")
        assert "1 stored vectors are not finite (NaN or inf), e.g. image 1" in problem.detail
        assert all("no saved index file" in note for note in report.notes)
    with open_catalog(directory) as catalog, catalog.reading():
        index = catalog.index(None)
        assert 1 not in index.ids().tolist() and len(index) == report.checked["image vectors"] - 1


def test_a_write_during_the_check_is_no_damage(tmp_path: Path) -> None:
    # The product vectors were read as the check began: one upload from another process
    # during it gave "entries but no vector" and the advice to delete the cache, exit 1.
    directory = tmp_path / "cat"
    shop(directory)
    writes = []
    with open_catalog(directory) as checker, open_catalog(directory) as writer:

        def upload_once(stage: str) -> None:
            if stage == "index file of images" and not writes:
                writes.append(add_image(writer, "new", unit_vectors(1, seed=7)[0],
                                        {"upper": unit_vectors(1, seed=8)[0]}))  # fmt: skip

        report = check_catalog(checker, progress=upload_once)
    assert writes and report.ok, report.problems
    with open_catalog(directory) as catalog:  # the check that passed read the write too
        assert report.checked["image vectors"] == catalog.counts()["images"]


def test_products_holding_one_sku_in_two_forms_are_reported(tmp_path: Path) -> None:
    # A store written between skus being normalised (2026-12-03) and decomposed rows being
    # found may hold "café" twice, composed and decomposed: lookups reached one product only,
    # a migrate merged the two, and the check called the catalog sound. Eighth round.
    import sqlite3
    import unicodedata

    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        add_image(catalog, "café", unit_vectors(1, seed=1)[0])
        add_image(catalog, "other", unit_vectors(1, seed=2)[0])
    finally:
        catalog.close()
    db = sqlite3.connect(directory / "catalog.sqlite")
    db.execute("UPDATE products SET sku = ? WHERE sku = 'other'",
               (unicodedata.normalize("NFD", "café"),))  # fmt: skip
    db.commit()
    db.close()
    [problem] = api.check_catalog(directory, blobs=False).problems
    assert (problem.what, problem.where) == ("sku", "'café'")
    assert "held by two or more products in other Unicode forms (e.g. products [1, 2])" in (
        problem.detail
    )
    assert "snapshop catalog remove --id 2" in problem.fix
