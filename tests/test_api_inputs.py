"""The Python API refuses wrong inputs with typed errors before it changes anything: keys of
the wrong type, numbers of the wrong type or range, images of any PIL mode or of no pixels,
output paths that would harm the catalog; and a decode worker that dies at start-up says why."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import db_rows, make_images, shop_csv
from PIL import Image
from shop_helpers import add_image, fill_shop, new_catalog, unit
from typer.testing import CliRunner

from snapshop import api, ingest
from snapshop.catalog.catalog import open_catalog
from snapshop.cli import app
from snapshop.data.sources import read_source
from snapshop.errors import ConfigError, ImageDecodeError, IngestError
from snapshop.images import DecodeLimits
from snapshop.ingest import Ingestor
from snapshop.search import ProductFilter, Searcher

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture()
def keyed(tmp_path: Path) -> Path:
    """Toy products whose skus look like ids and like each other: 1, 2, 12, A."""
    directory = tmp_path / "keyed"
    catalog = new_catalog(directory)
    try:
        rng = np.random.default_rng(3)
        for sku in ("1", "2", "12", "A"):
            add_image(catalog, sku, unit(rng)[0])
    finally:
        catalog.close()
    return directory


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("inputs") / "toy"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 8, seed=2)
    finally:
        catalog.close()
    return directory


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, lite0_model_dir: Path) -> dict[str, Any]:
    """A real catalog (lite0, no detector): 4 products x 2 rendered photos."""
    root = tmp_path_factory.mktemp("photos")
    images = make_images(root / "shop", n_products=4, per_product=2, size=64)
    csv_path = shop_csv(root / "shop.csv", images)
    api.index_source(csv_path, root / "cat", model=str(lite0_model_dir), detector="none")
    return {"catalog": root / "cat", "images": images, "csv": csv_path}


@pytest.fixture(scope="module")
def searcher(photos: dict[str, Any], lite0_embedder: Any):
    catalog = open_catalog(photos["catalog"])
    yield Searcher(catalog, lite0_embedder, None)
    catalog.close()


def skus(directory: Path) -> list[str]:
    return sorted(row[0] for row in db_rows(directory, "SELECT sku FROM products"))


# --- 1. remove_products keys -------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        {"skus": "12"},
        {"skus": b"12"},
        {"skus": ["12", 1]},
        {"ids": [True]},
        {"ids": ["3"]},
        {"ids": [2.0]},
        {"ids": 3},
        {"skus": ["A"], "ids": [None]},
    ],
)
def test_remove_refuses_keys_of_the_wrong_type(keyed: Path, call: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        api.remove_products(keyed, **call)
    assert skus(keyed) == ["1", "12", "2", "A"]


def test_remove_takes_numpy_ids_and_a_list_of_skus(keyed: Path) -> None:
    ids = {sku: pid for pid, sku in db_rows(keyed, "SELECT id, sku FROM products")}
    assert api.remove_products(keyed, ["12"], ids=[np.int64(ids["A"])]) == {"12": 1, "A": 1}
    assert skus(keyed) == ["1", "2"]


# --- 2. the README's example, and workers that die while starting ------------------------------
def test_readme_python_example_runs_under_a_main_guard() -> None:
    text = README.read_text()
    block = text[text.index("```python\nfrom snapshop import api") :]
    block = block[: block.index("```\n", 10)]
    guard = block.index('if __name__ == "__main__":')
    assert guard < block.index("api.index_source")


def test_workers_dying_at_start_name_the_main_guard(
    photos: dict[str, Any], lite0_embedder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that exits in its initializer stands for one whose script has no main guard
    (it re-runs the ingest at import and multiprocessing makes it exit)."""
    monkeypatch.setattr(ingest, "_worker_init", ingest.os._exit)  # spawned: pickled by name
    directory = shutil.copytree(photos["catalog"], tmp_path / "cat")
    images = make_images(tmp_path / "more", n_products=3, per_product=2, size=48, seed=9)
    records = read_source(shop_csv(tmp_path / "more.csv", images), [])
    with open_catalog(directory) as catalog:
        ingestor = Ingestor(catalog, lite0_embedder, None, batch_size=1, workers=1, mappers=0)
        with pytest.raises(IngestError, match=re.escape('if __name__ == "__main__":')) as err:
            ingestor.ingest(records)
    assert "workers=0" in str(err.value)


# --- 3. ingest settings ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        {"batch_size": 0},
        {"batch_size": -1},
        {"batch_size": None},
        {"batch_size": 2.5},
        {"batch_size": True},
        {"batch_size": 513},
        {"save_every": 0},
        {"prefetch_batches": 0},
        {"workers": -1},
        {"workers": 1.5},
        {"mappers": -2},
    ],
)
def test_ingestor_refuses_bad_settings(
    photos: dict[str, Any], lite0_embedder: Any, settings: dict[str, Any]
) -> None:
    with open_catalog(photos["catalog"]) as catalog, pytest.raises(ConfigError):
        Ingestor(catalog, lite0_embedder, None, **settings)


def test_index_source_refuses_batch_size_0_before_writing(
    photos: dict[str, Any], lite0_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        api.index_source(photos["csv"], tmp_path / "new", model=str(lite0_model_dir),
                         batch_size=0, workers=1)  # fmt: skip
    assert not (tmp_path / "new").exists()
    directory = shutil.copytree(photos["catalog"], tmp_path / "cat")
    card = (directory / "catalog.json").read_bytes()
    with pytest.raises(ConfigError, match="batch_size"):
        api.index_source(photos["csv"], directory, catalog_views=1, batch_size=np.int8(0))
    assert (directory / "catalog.json").read_bytes() == card


# --- 4. query images ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "YCbCr", "HSV", "LAB", "CMYK", "I;16"])
def test_a_pil_query_of_any_mode_is_searched_as_rgb(
    searcher: Searcher, photos: dict[str, Any], mode: str
) -> None:
    path = next(iter(photos["images"].values()))[0]
    want = searcher.search(path, 3).image_results
    query = Image.open(path).convert(mode)
    got = searcher.search(query, 3).image_results
    assert query.mode == mode  # the caller's image is left as it was
    assert len(got) == len(want)
    if mode not in ("L", "LA", "P", "I;16"):  # colour kept: the same ranking
        assert [h.sku for h in got] == [h.sku for h in want]
        assert got[0].score == pytest.approx(want[0].score, abs=0.02)


def test_a_pil_query_follows_the_limits(searcher: Searcher, photos: dict[str, Any]) -> None:
    with pytest.raises(ImageDecodeError, match="no pixels"):
        searcher.search(Image.new("RGB", (0, 0)), 3)
    small = Searcher(searcher.catalog, searcher.embedder, limits=DecodeLimits(max_pixels=1000))
    with pytest.raises(ImageDecodeError, match="pixels, limit is 1000"):
        small.search(Image.new("RGB", (40, 40)), 3)
    reduced = Searcher(searcher.catalog, searcher.embedder, limits=DecodeLimits(max_side=32))
    result = reduced.search(Image.new("RGB", (64, 48), "red"), 3)
    assert result.query_size == (64, 48)


def test_query_sources_of_other_types(searcher: Searcher, photos: dict[str, Any]) -> None:
    path = next(iter(photos["images"].values()))[0]
    want = [h.sku for h in searcher.search(path, 3).image_results]
    data = path.read_bytes()
    assert [h.sku for h in searcher.search(bytearray(data), 3).image_results] == want
    assert [h.sku for h in searcher.search(memoryview(data), 3).image_results] == want
    for source in (None, io.BytesIO(data), np.zeros((8, 8, 3), np.uint8), 3):
        with pytest.raises(ConfigError, match="path, the file's bytes or a PIL image"):
            searcher.search(source, 3)  # type: ignore[arg-type]


# --- 5. numbers --------------------------------------------------------------------------------
def test_k_is_a_whole_number(searcher: Searcher, photos: dict[str, Any], toy: Path) -> None:
    path = next(iter(photos["images"].values()))[0]
    assert len(searcher.search(path, np.int64(2)).image_results) == 2
    assert len(api.similar(toy, "p00", k=np.int32(2)).image_results) == 2
    for k in (2.0, True, "3", None, 0, 1001):
        with pytest.raises(ConfigError, match="k must be"):
            searcher.search(path, k)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="k must be"):
            api.similar(toy, "p00", k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize("price", [2**63, 10**30, np.float32(1e6)])
def test_large_prices_filter(searcher: Searcher, photos: dict[str, Any], price: Any) -> None:
    path = next(iter(photos["images"].values()))[0]
    every = [h.sku for h in searcher.search(path, 8).image_results]
    below = searcher.search(path, 8, filters=ProductFilter(max_price=price)).image_results
    assert [h.sku for h in below] == every
    assert not searcher.search(path, 8, filters=ProductFilter(min_price=price)).image_results


@pytest.mark.parametrize(
    "fields",
    [{"max_price": "5"}, {"min_price": True}, {"max_price": 10**400}, {"min_price": -1},
     {"max_price": float("nan")}, {"category": 3}],
)  # fmt: skip
def test_product_filter_refuses(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ProductFilter(**fields)


def test_recommend_checks_numbers_before_writing(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "similar.csv"
    for settings in ({"k": 2.5}, {"k": True}, {"batch_size": 2.5}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            api.recommend(toy, out, **settings)
        assert not list(tmp_path.iterdir())
    report = api.recommend(toy, out, k=np.int64(3), batch_size=np.int64(4))
    assert report.k == 3 and isinstance(report.k, int)
    assert report.to_dict()["k"] == 3


def test_other_numbers_and_keys(toy: Path) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        api.duplicates(toy, threshold="0.9")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pixel_threshold"):
        api.duplicates(toy, pixel_threshold=float("nan"))
    with pytest.raises(ConfigError, match="grace_seconds"):
        api.collect_garbage(toy, grace_seconds="5")  # type: ignore[arg-type]
    for product in (None, 6.9, True, [1]):
        with pytest.raises(ConfigError, match="sku"):
            api.similar(toy, product)  # type: ignore[arg-type]
    assert api.similar(toy, np.int64(1)).image_results


# --- 6. output paths ---------------------------------------------------------------------------
def test_outputs_inside_the_catalog_are_refused(toy: Path, tmp_path: Path) -> None:
    directory = shutil.copytree(toy, tmp_path / "cat")
    db = (directory / "catalog.sqlite").read_bytes()
    for where in ({"out": directory / "catalog.sqlite"}, {"html": directory / "page.html"},
                  {"out": tmp_path / "cat" / ".." / "cat" / "x.csv"}):  # fmt: skip
        with pytest.raises(ConfigError, match="inside the catalog"):
            api.duplicates(directory, **where)
    with pytest.raises(ConfigError, match="inside the catalog"):
        api.recommend(directory, directory / "similar.csv")
    assert (directory / "catalog.sqlite").read_bytes() == db
    result = CliRunner().invoke(
        app, ["catalog", "duplicates", "-c", str(directory), "--out",
              str(directory / "catalog.sqlite")],
    )  # fmt: skip
    assert result.exit_code != 0
    assert (directory / "catalog.sqlite").read_bytes() == db
    assert api.catalog_info(directory)["products"] == 8


def test_outputs_that_are_folders_are_refused_before_the_work(toy: Path, tmp_path: Path) -> None:
    folder = tmp_path / "existing.csv"
    folder.mkdir()
    (tmp_path / "file").write_text("")
    for out in (folder, tmp_path / "file" / "similar.csv"):
        with pytest.raises(ConfigError, match="folder"):
            api.recommend(toy, out)
        with pytest.raises(ConfigError, match="folder"):
            api.duplicates(toy, out=out)
        with pytest.raises(ConfigError, match="folder"):
            api.duplicates(toy, html=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.csv", "file"]
    assert not list(folder.iterdir())


def test_a_removal_cut_short_can_be_run_again_with_missing_ok(tmp_path: Path) -> None:
    from snapshop.catalog.catalog import create_catalog
    from snapshop.errors import NotFoundError

    catalog = create_catalog(tmp_path / "c", model_id="m@1", model_ref="m", dim=4)
    with catalog.writing() as write:
        for sku in ("a", "b", "c"):
            write.upsert_product(sku)
    catalog.close()
    assert api.remove_products(tmp_path / "c", ["a"]) == {"a": 0}  # the run cut short
    with pytest.raises(NotFoundError, match="--missing-ok"):
        api.remove_products(tmp_path / "c", ["a", "b"])  # nothing removed: a typo stays loud
    assert api.remove_products(tmp_path / "c", ["a", "b"], ids=[99], missing_ok=True) == {"b": 0}
    with api.open_catalog(tmp_path / "c") as reopened:
        assert [p.sku for p in reopened.list_products()] == ["c"]
