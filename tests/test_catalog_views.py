"""Issue #20's test-time levers in the pipeline: catalog views averaged into a packshot's
vector at indexing time (recorded in the catalog card), query flip averaging at search time.
Checked against brute force: each view embedded on its own, normalised, averaged."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import db_rows
from PIL import Image, ImageDraw

from snapshop import api
from snapshop.catalog.card import CatalogCard
from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.data.sources import read_source
from snapshop.errors import CatalogError, ConfigError
from snapshop.ingest import Ingestor
from snapshop.models.tta import (
    MAX_CATALOG_VIEWS,
    check_view_count,
    is_packshot,
    mirror,
    packshot_views,
)
from snapshop.search import Searcher
from snapshop.service.settings import FLIP_QUERY_ENV, ServiceSettings, flip_query_from_env
from snapshop.service.state import ServiceState

VIEWS = 3  # augmented views per packshot in these tests (24 in the benchmark)


def packshot_image(seed: int, size: int = 160) -> Image.Image:
    """A coloured product (a box and a round label) alone on white."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colour = tuple(rng.randint(0, 200) for _ in range(3))
    draw.rectangle((40, 25, 120, 135), fill=colour)
    draw.ellipse((60, 50, 100, 90), fill=tuple(255 - c for c in colour))
    return image


def cluttered_photo(seed: int, size: int = 160) -> Image.Image:
    """A shop photo: the product on a busy background reaching every border."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    ImageDraw.Draw(image).rectangle((50, 40, 110, 120), fill=(220, 40, 30))
    return image


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def brute_mean(embedder, images: list[Image.Image]) -> np.ndarray:
    """Each image embedded alone, normalised; the mean, normalised."""
    vecs = [unit(embedder.embed_images([im])[0].astype(np.float64)) for im in images]
    return unit(np.mean(vecs, axis=0))


@pytest.fixture()
def shop(tmp_path: Path) -> dict[str, Path]:
    """Two products, each a packshot and a cluttered photo, as a folder source."""
    paths = {}
    for n in range(2):
        folder = tmp_path / "shop" / f"sku{n}"
        folder.mkdir(parents=True)
        packshot_image(n).save(folder / "packshot.png")
        cluttered_photo(n).save(folder / "photo.png")
        paths[f"sku{n}/packshot"] = folder / "packshot.png"
        paths[f"sku{n}/photo"] = folder / "photo.png"
    return paths


def stored_vectors(catalog_dir: Path) -> dict[str, np.ndarray]:
    """{source path: vector}, read from the SQLite file directly."""
    rows = db_rows(catalog_dir, "SELECT source, vector FROM images")
    return {src: np.frombuffer(vec, np.float32) for src, vec in rows}


def test_packshot_rule_tells_a_product_on_white_from_a_photo() -> None:
    assert is_packshot(packshot_image(0))
    assert not is_packshot(cluttered_photo(0))
    assert not is_packshot(Image.new("RGB", (100, 100), (255, 255, 255)))  # nothing on it
    # a product on white that touches one side is still a packshot (3/4 of the ring white)
    touching = Image.new("RGB", (100, 100), (255, 255, 255))
    ImageDraw.Draw(touching).rectangle((0, 20, 40, 80), fill=(10, 80, 160))
    assert is_packshot(touching)
    # a product on a light grey studio background is not (its border is not near-white)
    grey = Image.new("RGB", (100, 100), (200, 200, 200))
    ImageDraw.Draw(grey).rectangle((30, 30, 70, 70), fill=(10, 80, 160))
    assert not is_packshot(grey)


def test_packshot_views_are_the_mirror_and_reproducible_augmented_views() -> None:
    image = packshot_image(1)
    views = packshot_views(image, VIEWS)
    assert len(views) == VIEWS + 1
    assert np.array_equal(np.asarray(views[0]), np.asarray(mirror(image)))
    again = packshot_views(image, VIEWS)
    for a, b in zip(views, again, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bad", [-1, MAX_CATALOG_VIEWS + 1, 2.5, True, "3", None])
def test_bad_view_counts_are_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError, match="catalog views"):
        check_view_count(bad)
    assert check_view_count(0) == 0 and check_view_count(MAX_CATALOG_VIEWS) == MAX_CATALOG_VIEWS


@pytest.mark.parametrize("mappers", [None, 0], ids=["per-photo mappers", "batch mapper"])
def test_a_packshot_gets_the_mean_of_its_views_and_a_photo_does_not(
    tmp_path: Path, shop: dict[str, Path], lite0_model_dir: Path, lite0_embedder, mappers
) -> None:
    catalog_dir = tmp_path / "cat"
    with create_catalog(
        catalog_dir, model_id=lite0_embedder.model_id, model_ref=str(lite0_model_dir),
        dim=lite0_embedder.dim,
    ) as catalog:  # fmt: skip
        catalog.record_catalog_views(VIEWS)
        ingestor = Ingestor(catalog, lite0_embedder, workers=0, mappers=mappers, batch_size=8)
        report = ingestor.ingest(read_source(tmp_path / "shop"))
    assert report.added == 4
    stored = stored_vectors(catalog_dir)
    for name, path in shop.items():
        image = Image.open(path).convert("RGB")
        plain = unit(lite0_embedder.embed_images([image])[0].astype(np.float64))
        vector = stored[str(path)]
        if name.endswith("packshot"):
            expected = brute_mean(lite0_embedder, [image, *packshot_views(image, VIEWS)])
            np.testing.assert_allclose(vector, expected, atol=2e-3)
            assert float(vector @ plain) < 0.995  # the views moved it: not the image alone
        else:
            np.testing.assert_allclose(vector, plain, atol=2e-3)


def test_the_card_keeps_one_setting_and_a_different_one_writes_nothing(
    tmp_path: Path, shop: dict[str, Path], lite0_model_dir: Path, lite0_embedder
) -> None:
    catalog_dir = tmp_path / "cat"
    with pytest.raises(ConfigError):  # checked before anything is created
        api.index_source(tmp_path / "shop", catalog_dir, model=str(lite0_model_dir),
                         catalog_views=-2)  # fmt: skip
    assert not catalog_dir.exists()
    first = shop.pop("sku1/packshot")
    first.rename(tmp_path / "later.png")
    api.index_source(tmp_path / "shop", catalog_dir, model=str(lite0_model_dir),
                     catalog_views=VIEWS)  # fmt: skip
    card = json.loads((catalog_dir / "catalog.json").read_text())
    assert card["catalog_views"] == VIEWS
    with open_catalog(catalog_dir) as catalog:
        assert catalog.info()["catalog_views"] == VIEWS
    before = stored_vectors(catalog_dir)

    (tmp_path / "later.png").rename(first)
    with pytest.raises(ConfigError, match=f"indexed with {VIEWS} catalog views"):
        api.index_source(tmp_path / "shop", catalog_dir, model=str(lite0_model_dir),
                         catalog_views=0)  # fmt: skip
    after = stored_vectors(catalog_dir)  # nothing written
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert json.loads((catalog_dir / "catalog.json").read_text())["catalog_views"] == VIEWS

    # the option left out: the card's setting applies to the new packshot
    report = api.index_source(tmp_path / "shop", catalog_dir, model=str(lite0_model_dir))
    assert report.added == 1
    image = Image.open(first).convert("RGB")
    expected = brute_mean(lite0_embedder, [image, *packshot_views(image, VIEWS)])
    np.testing.assert_allclose(stored_vectors(catalog_dir)[str(first)], expected, atol=2e-3)


def test_card_reads_views_and_refuses_bad_ones() -> None:
    base = {"format": "snapshop-catalog/1", "model_id": "m@1", "model_ref": "m", "dim": 8}
    assert CatalogCard.from_json(base).catalog_views == 0  # a card from before issue #20
    assert "catalog_views" not in CatalogCard.from_json(base).to_json()
    card = CatalogCard.from_json({**base, "catalog_views": 24})
    assert card.catalog_views == 24 and card.to_json()["catalog_views"] == 24
    for bad in (-1, "24", 2.0, True):
        with pytest.raises(CatalogError, match="catalog_views"):
            CatalogCard.from_json({**base, "catalog_views": bad})


@pytest.fixture()
def flip_catalog(tmp_path: Path, lite0_model_dir: Path) -> Path:
    """Six products of one packshot each, indexed without catalog views."""
    for n in range(6):
        folder = tmp_path / "flip" / f"sku{n}"
        folder.mkdir(parents=True)
        packshot_image(10 + n).save(folder / "a.png")
    api.index_source(tmp_path / "flip", tmp_path / "cat", model=str(lite0_model_dir))
    return tmp_path / "cat"


def test_flip_query_searches_with_the_mean_of_the_photo_and_its_mirror(
    flip_catalog: Path, lite0_embedder
) -> None:
    # an asymmetric query: its mirror embeds differently
    query = cluttered_photo(3)
    ImageDraw.Draw(query).polygon([(0, 0), (90, 0), (0, 150)], fill=(30, 200, 60))
    expected_query = brute_mean(lite0_embedder, [query, mirror(query)])
    plain_query = unit(lite0_embedder.embed_images([query])[0].astype(np.float64))
    assert float(expected_query @ plain_query) < 0.999
    vectors = {int(i): np.frombuffer(v, np.float32)
               for i, v in db_rows(flip_catalog, "SELECT id, vector FROM images")}  # fmt: skip
    with open_catalog(flip_catalog) as catalog:
        searcher = Searcher(catalog, lite0_embedder, ranking="image", flip_query=True)
        flipped = searcher.search(query, k=6)
        plain = searcher.search(query, k=6, flip_query=False)
    for result, q in ((flipped, expected_query), (plain, plain_query)):
        scores = [h.score for h in result.image_results]
        brute = [float(vectors[h.image_id] @ q) for h in result.image_results]
        np.testing.assert_allclose(scores, brute, atol=2e-3)
        assert scores == sorted(scores, reverse=True)
        assert len(scores) == 6
    assert [h.score for h in flipped.image_results] != [h.score for h in plain.image_results]


def test_flip_query_settings_refuse_what_is_not_a_flag(
    flip_catalog: Path, lite0_embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_catalog(flip_catalog) as catalog:
        with pytest.raises(ConfigError, match="flip_query"):
            Searcher(catalog, lite0_embedder, flip_query="yes")  # type: ignore[arg-type]
        searcher = Searcher(catalog, lite0_embedder)
        assert searcher.flip_query is False  # off by default
        with pytest.raises(ConfigError, match="flip_query"):
            searcher.search(packshot_image(0), flip_query=1)  # type: ignore[arg-type]
        ServiceState(ServiceSettings(flip_catalog, flip_query=True), searcher)
        assert searcher.flip_query is True  # the service's setting reaches its searcher
    with pytest.raises(ConfigError, match="flip_query"):
        ServiceSettings(flip_catalog, flip_query="no")  # type: ignore[arg-type]
    monkeypatch.setenv(FLIP_QUERY_ENV, "yes")
    assert flip_query_from_env() is True and ServiceSettings(flip_catalog).flip_query is True
    monkeypatch.setenv(FLIP_QUERY_ENV, "")
    assert ServiceSettings(flip_catalog).flip_query is False
    monkeypatch.setenv(FLIP_QUERY_ENV, "maybe")
    with pytest.raises(ConfigError, match=FLIP_QUERY_ENV):
        ServiceSettings(flip_catalog)


def test_cli_records_views_refuses_a_change_and_searches_flipped(
    tmp_path: Path, shop: dict[str, Path], lite0_model_dir: Path, lite0_embedder
) -> None:
    from typer.testing import CliRunner

    from snapshop.cli import app

    def invoke(*args: object):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(app, [str(a) for a in args])

    catalog_dir, source = tmp_path / "cat", tmp_path / "shop"
    bad = invoke("index", source, "--catalog", catalog_dir, "--model", lite0_model_dir,
                 "--catalog-views", MAX_CATALOG_VIEWS + 1)  # fmt: skip
    assert bad.exit_code == 2 and not catalog_dir.exists()
    done = invoke("index", source, "--catalog", catalog_dir, "--model", lite0_model_dir,
                  "--catalog-views", VIEWS)  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads((catalog_dir / "catalog.json").read_text())["catalog_views"] == VIEWS
    changed = invoke("index", source, "--catalog", catalog_dir, "--catalog-views", 0)
    assert changed.exit_code == 2, changed.output
    assert "catalog views" in changed.stderr and "Traceback" not in changed.output

    query = tmp_path / "query.png"
    cluttered_photo(5).save(query)
    found = invoke("search", query, "--catalog", catalog_dir, "--flip-query", "--json",
                   "--ranking", "image", "-k", 2)  # fmt: skip
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["image_results"]
    image = Image.open(query).convert("RGB")
    expected = brute_mean(lite0_embedder, [image, mirror(image)])
    vectors = {int(i): np.frombuffer(v, np.float32)
               for i, v in db_rows(catalog_dir, "SELECT id, vector FROM images")}  # fmt: skip
    for hit in hits:
        assert hit["score"] == pytest.approx(float(vectors[hit["image_id"]] @ expected), abs=2e-3)


@pytest.mark.server
def test_a_server_catalog_keeps_the_setting_in_its_card_row_too(
    tmp_path: Path, shop: dict[str, Path], lite0_model_dir: Path, lite0_embedder, pg_database: str
) -> None:
    api.index_source(tmp_path / "shop", pg_database, model=str(lite0_model_dir), workers=0,
                     catalog_views=VIEWS)  # fmt: skip
    with open_catalog(pg_database) as catalog:
        assert catalog.is_server and catalog.catalog_views == VIEWS
        assert catalog.counts()["images"] == 4
        sources = {
            row.id: row.source
            for product in catalog.list_products()
            for row in catalog.images_of(product.id)
        }
        vectors = {
            sources[int(i)]: v
            for ids, vecs in catalog.store.iter_vectors("images", catalog.dim)
            for i, v in zip(ids, vecs, strict=True)
        }
    image = Image.open(shop["sku0/packshot"]).convert("RGB")
    expected = brute_mean(lite0_embedder, [image, *packshot_views(image, VIEWS)])
    np.testing.assert_allclose(vectors[str(shop["sku0/packshot"])], expected, atol=2e-3)
    photo = Image.open(shop["sku0/photo"]).convert("RGB")  # not a packshot: embedded alone
    np.testing.assert_allclose(
        vectors[str(shop["sku0/photo"])], brute_mean(lite0_embedder, [photo]), atol=2e-3
    )
    with pytest.raises(ConfigError, match=f"indexed with {VIEWS} catalog views"):
        api.index_source(tmp_path / "shop", pg_database, model=str(lite0_model_dir),
                         workers=0, catalog_views=0)  # fmt: skip
