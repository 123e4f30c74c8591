"""Catalog sources that used to get past the whole-file check, or lose values silently: a
product's attributes spread over rows (too large together, or disagreeing), values under a
column with no name, a folder name no product id may have, a catalog kept inside the folder
it indexes, and `--sync` run from another working directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from catalog_helpers import check_catalog_dir, db_rows, make_images, write_csv

from snapshop import api
from snapshop.data.sources import read_csv_manifest, read_folder
from snapshop.errors import ManifestError

BIG = "x" * 12_000  # one row's attribute under the 20,000-character limit; two are over


@pytest.fixture()
def shop(tmp_path: Path) -> dict[str, list[Path]]:
    return make_images(tmp_path / "shop", n_products=3, per_product=2)


def index(source: Path, catalog: Path, model: Path, **kwargs: object):
    return api.index_source(source, catalog, model=str(model), **kwargs)  # type: ignore[arg-type]


def test_attributes_too_large_together_stop_the_csv_at_its_line(tmp_path, shop):
    a, b = list(shop)[:2]
    rows = [[b, shop[b][0], "", ""], [a, shop[a][0], BIG, ""], [a, shop[a][1], "", BIG]]
    path = write_csv(tmp_path / "big.csv", rows, ["product_id", "image_path", "col1", "col2"])
    with pytest.raises(ManifestError, match=r"big\.csv:4: .*together.*limit 20000"):
        read_csv_manifest(path)


def test_attributes_that_disagree_across_rows_stop_the_csv(tmp_path, shop):
    a = next(iter(shop))
    rows = [[a, shop[a][0], "red"], [a, shop[a][1], "blue"]]
    path = write_csv(tmp_path / "c.csv", rows, ["product_id", "image_path", "color"])
    with pytest.raises(ManifestError, match=r"c\.csv:3: .*attribute 'color' 'blue'.*line 2"):
        read_csv_manifest(path)
    rows = [[a, shop[a][0], "red"], [a, shop[a][1], ""]]  # left empty: no disagreement
    records = read_csv_manifest(write_csv(tmp_path / "ok.csv", rows, ["product_id",
                                          "image_path", "color"]))  # fmt: skip
    assert records[0].metadata["attributes"] == {"color": "red"}


def test_columns_with_no_name_must_stay_empty(tmp_path, shop):
    a = next(iter(shop))
    header = ["product_id", "image_path", "", "size", ""]
    trailing = write_csv(tmp_path / "t.csv", [[a, shop[a][0], "", "M", ""]], header)
    assert read_csv_manifest(trailing)[0].metadata["attributes"] == {"size": "M"}
    lost = write_csv(tmp_path / "l.csv", [[a, shop[a][0], "v1", "M", "v2"]], header)
    with pytest.raises(ManifestError, match=r"l\.csv:2: 'v1' in column 3, which has no name"):
        read_csv_manifest(lost)


def test_attributes_over_the_limit_with_the_stored_ones_fail_one_image(
    tmp_path, shop, lite0_model_dir
):
    """Each CSV fits alone; the second, merged with what the first stored, does not: its
    image fails with the reason and the rest of its batch is indexed."""
    (a, b, c), cat = list(shop), tmp_path / "cat"
    header = ["product_id", "image_path", "col1", "col2"]
    index(write_csv(tmp_path / "1.csv", [[a, shop[a][0], BIG, ""]], header), cat,
          lite0_model_dir)  # fmt: skip
    rows = [[b, shop[b][0], "", ""], [a, shop[a][1], "", BIG], [c, shop[c][0], "", ""]]
    report = index(write_csv(tmp_path / "2.csv", rows, header), cat, lite0_model_dir)
    assert report.added == 2
    assert [f[0] for f in report.failed] == [str(shop[a][1])]
    assert "limit 20000" in report.failed[0][1]
    stored = json.loads(db_rows(cat, f"SELECT attributes FROM products WHERE sku = '{a}'")[0][0])
    assert stored == {"col1": BIG}  # unchanged
    assert check_catalog_dir(cat) == {"products": 3, "images": 3, "crops": 0}


def test_a_folder_name_no_product_may_have_stops_before_anything_is_written(tmp_path, shop):
    bad = tmp_path / "shop" / "tab\tname"
    bad.mkdir()
    shutil.copy(next(iter(shop.values()))[0], bad / "a.jpg")
    with pytest.raises(ManifestError, match=r"tab\\tname.*not a product id"):
        list(read_folder(tmp_path / "shop"))


def test_a_catalog_inside_the_indexed_folder_is_not_a_product(tmp_path, shop, lite0_model_dir):
    cat = tmp_path / "shop" / "zcat"
    index(tmp_path / "shop", cat, lite0_model_dir)
    report = index(tmp_path / "shop", cat, lite0_model_dir)
    assert report.added == 0 and report.products == set(shop)
    assert (str(cat), "a snapshop catalog, not a product folder") in report.ignored


def test_sync_from_another_directory_keeps_listed_images_it_cannot_read(
    tmp_path, shop, lite0_model_dir, monkeypatch
):
    a, cat = next(iter(shop)), tmp_path / "cat"
    (tmp_path / "img").mkdir()
    for n, image in enumerate(shop[a][:2]):
        shutil.copy(image, tmp_path / "img" / f"{n}.jpg")
    csv_path = write_csv(tmp_path / "a.csv", [[a, "img/0.jpg"], [a, "img/1.jpg"]],
                         ["product_id", "image_path"])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    index(Path("a.csv"), cat, lite0_model_dir)  # a relative CSV path
    (tmp_path / "img" / "1.jpg").rename(tmp_path / "away.jpg")  # listed, unreadable for now
    monkeypatch.chdir("/")
    report = index(csv_path, cat, lite0_model_dir, sync=True)  # the same CSV, spelled absolute
    assert report.removed == 0
    assert check_catalog_dir(cat)["images"] == 2
    sources = {row[0] for row in db_rows(cat, "SELECT source FROM images")}
    assert sources == {str(tmp_path / "img" / f"{n}.jpg") for n in range(2)}
    assert all(os.path.isabs(s) for s in sources)


def test_errors_in_rows_that_span_lines_name_the_line_they_start_on(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('product_id,image_path,title\n\np1,x.jpg,"two\nlines"\n')
    with pytest.raises(ManifestError, match=r"m\.csv:3: product title"):
        read_csv_manifest(path)
    path.write_text('product_id,image_path,colour\np1,x.jpg,"a\nb"\n\np2,y.jpg,c,extra\n')
    with pytest.raises(ManifestError, match=r"m\.csv:5: more fields"):
        read_csv_manifest(path)
