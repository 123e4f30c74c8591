"""Seventh adversarial round (reliability.md): a resumed export of another catalog, skus a
store holds in their legacy decomposed form, duplicates' output paths, and digits that are
digits to ``str.isdigit`` only. Each test fails on the code before its fix."""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shop_helpers import add_image, near, new_catalog, unit
from typer.testing import CliRunner

import snapshop.recommend as recommend
from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.catalog.migrate import migrate_catalog
from snapshop.cli import app
from snapshop.errors import CatalogError, ConfigError

CAFE_NFD = unicodedata.normalize("NFD", "café")


def shop(directory: Path, skus: list[str], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    catalog = new_catalog(directory)
    try:
        for sku in skus:
            add_image(catalog, sku, unit(rng)[0])
    finally:
        catalog.close()
    return directory


def interrupted_export(directory: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export of ``directory`` to ``out`` (k 2, batches of 10) interrupted in its second
    batch, its resume point left behind."""
    write, calls = recommend._RowSink.write, {"n": 0}

    def interrupted(self: Any, table: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return write(self, table)

    with monkeypatch.context() as patch:
        patch.setattr(recommend._RowSink, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            api.recommend(directory, out, k=2, batch_size=10)


# --- recommend: the resume point is the catalog's ------------------------------------------
def test_an_export_of_another_catalog_is_not_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The progress file named no catalog: another catalog's unfinished export into the same
    # file was carried on (exit 0): its rows stayed, this catalog's first products never came.
    staging = shop(tmp_path / "staging", [f"STAGING-{i}" for i in range(30)], seed=2)
    prod = shop(tmp_path / "prod", [f"PROD-{i}" for i in range(30)], seed=3)
    out = tmp_path / "similar.csv"
    interrupted_export(staging, out, monkeypatch)
    with pytest.raises(ConfigError, match=r"an unfinished export of another catalog .*restart"):
        api.recommend(prod, out, k=2, batch_size=10)
    api.recommend(prod, out, k=2, batch_size=10, restart=True)
    with open(out, newline="") as fh:
        skus = {row["sku"] for row in csv.DictReader(fh)}
    assert skus == {f"PROD-{i}" for i in range(30)}


def test_an_export_is_not_resumed_on_a_catalog_made_again_in_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    directory = shop(tmp_path / "cat", [f"A-{i}" for i in range(30)], seed=2)
    out = tmp_path / "similar.csv"
    interrupted_export(directory, out, monkeypatch)
    shutil.rmtree(directory)
    shop(directory, [f"B-{i}" for i in range(31)], seed=3)  # the same place, made again
    with open_catalog(directory) as catalog:  # made within the same second: same card stamp
        catalog.rewrite_card(created_at="2000-01-01T00:00:00+00:00")
    with pytest.raises(ConfigError, match=r"another catalog|generation"):
        api.recommend(directory, out, k=2, batch_size=10)


# --- skus stored decomposed (NFD), as before 2026-12-03 -------------------------------------
def legacy_sku(directory: Path, sku: str, stored_as: str) -> None:
    db = sqlite3.connect(directory / "catalog.sqlite")
    db.execute("UPDATE products SET sku = ? WHERE sku = ?", (stored_as, sku))
    db.commit()
    db.close()


def test_a_sku_stored_decomposed_is_found_and_takes_the_stored_form_on_its_next_write(
    tmp_path: Path,
) -> None:
    directory = shop(tmp_path / "cat", ["T1", "cafe", "ok"])
    legacy_sku(directory, "cafe", CAFE_NFD)
    with open_catalog(directory) as catalog:
        found = catalog.find_product("café")
        assert found is not None and found.sku == CAFE_NFD
        assert set(catalog.store.products_by_skus(["café", CAFE_NFD, "ok"])) == {"café", "ok"}
        add_image(catalog, "café", unit(np.random.default_rng(5))[0])  # one more image
        assert catalog.counts()["products"] == 3  # the same product, not a second one
        healed = catalog.find_product(CAFE_NFD)
        assert healed is not None and healed.id == found.id and healed.sku == "café"
        assert len(catalog.images_of(found.id)) == 2


@pytest.mark.parametrize("mirror", [False, True])
def test_migrate_keeps_a_source_product_whose_sku_is_stored_decomposed(
    tmp_path: Path, mirror: bool
) -> None:
    # The copy stores "café" composed; asked for it, the source found nothing: without
    # --mirror it was reported as not in the source, with --mirror deleted, and every run
    # then failed its check ("was either written to during the copy? run it again").
    src = shop(tmp_path / "src", ["T1", "cafe", "ok"])
    legacy_sku(src, "cafe", CAFE_NFD)
    for _ in range(2):
        report = migrate_catalog(src, tmp_path / "dst", mirror=mirror)
        assert report.products_not_in_source == 0
    with open_catalog(tmp_path / "dst") as dst:
        assert dst.counts() == {"products": 3, "images": 3, "crops": 0}


def test_migrate_refuses_a_source_holding_one_sku_in_two_forms(tmp_path: Path) -> None:
    # Both forms held by two products (a store written between normalisation and healing):
    # the copy merged them into one product, and --mirror failed every run on the counts.
    # Eighth round.
    src = shop(tmp_path / "src", ["café", "other"])
    legacy_sku(src, "other", CAFE_NFD)
    with pytest.raises(CatalogError, match=r"in other Unicode forms .*'café': products \[1, 2\]"):
        migrate_catalog(src, tmp_path / "dst", mirror=True)
    assert not (tmp_path / "dst").exists()


# --- duplicates: where the CSV goes ----------------------------------------------------------
@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.parquet", "pairs"])
def test_duplicates_are_written_only_to_a_csv_file(tmp_path: Path, name: str) -> None:
    directory = shop(tmp_path / "cat", ["a", "b"])
    with pytest.raises(ConfigError, match="written as CSV; name the file .csv"):
        api.duplicates(directory, out=tmp_path / name, pixel_check=False)
    assert not (tmp_path / name).exists()


def test_duplicates_csv_and_page_in_one_file_are_refused(tmp_path: Path) -> None:
    # The page replaced the CSV, and the command said "-> pairs.csv, pairs.csv", exit 0.
    catalog = new_catalog(tmp_path / "cat")
    rng = np.random.default_rng(0)
    v = unit(rng)[0]
    add_image(catalog, "a", v)
    add_image(catalog, "b", near(rng, v, 0.01))
    catalog.close()
    same = tmp_path / "pairs.csv"
    command = ["catalog", "duplicates", "--catalog", str(tmp_path / "cat"), "-o", str(same),
               "--html", str(same), "--no-pixel-check"]  # fmt: skip
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "the CSV and the page would be one file" in result.output
    assert not same.exists()


# --- digits to str.isdigit only --------------------------------------------------------------
@pytest.mark.parametrize("key", ["²", "١", "１"])
def test_a_key_of_other_digits_is_no_product_id(tmp_path: Path, key: str) -> None:
    # "²" raised a raw ValueError out of int(); "١" and "１" were taken as product id 1.
    directory = shop(tmp_path / "cat", ["p1", "p2"])
    with pytest.raises(CatalogError, match="no product with sku"):
        api.similar(directory, key)


def test_the_cli_starts_with_a_columns_of_other_digits(tmp_path: Path) -> None:
    # rich parsed COLUMNS with int() while the CLI built its consoles, at import.
    env = {**os.environ, "COLUMNS": "²"}
    script = "import sys; sys.argv = ['snapshop', '--help']; from snapshop.cli import app; app()"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-500:]
    assert "visual search" in done.stdout
