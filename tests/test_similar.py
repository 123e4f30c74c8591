"""More like this against a brute-force reference over the catalog's stored vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import db_rows
from shop_helpers import add_image, fill_shop, new_catalog, product_ids, stored, unit
from typer.testing import CliRunner

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.cli import app
from snapshop.errors import CatalogError, ConfigError
from snapshop.search import ProductFilter
from snapshop.similar import similar_products


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("similar") / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 30, seed=3)
    finally:
        catalog.close()
    return directory


def reference(
    catalog_dir: Path, sku: str, k: int, position: str | None = None, accept=None
) -> list[tuple[int, float, int]]:
    """Brute force: every (own vector, other vector) pair; best pair per other product."""
    entries = stored(catalog_dir, "images" if position is None else "crops", position)
    target = product_ids(catalog_dir)[sku]
    queries = [vec for product, vec in entries.values() if product == target]
    best: dict[int, tuple[float, int]] = {}
    for entry, (product, vec) in entries.items():
        if product == target or (accept is not None and not accept(product)):
            continue
        score = max(float(q @ vec) for q in queries)
        if product not in best or score > best[product][0]:
            best[product] = (score, entry)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
    return [(p, s, e) for p, (s, e) in ranked]


def as_tuples(hits) -> list[tuple[int, float, int]]:
    return [
        (h.product_id, h.score, h.crop_id if h.crop_id is not None else h.image_id) for h in hits
    ]


def assert_same(got: list, want: list) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2] for g in got] == [w[2] for w in want]
    assert np.allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 29, 100])
def test_image_and_item_results_match_brute_force(shop: Path, k: int) -> None:
    catalog = open_catalog(shop)
    try:
        for sku in ("p00", "p07", "p21"):
            result = similar_products(catalog, sku, k)
            assert_same(as_tuples(result.image_results), reference(shop, sku, k))
            own_positions = {
                r[0]
                for r in db_rows(
                    shop,
                    "SELECT DISTINCT c.position FROM crops c"
                    f" JOIN images i ON c.image_id = i.id JOIN products p ON"
                    f" i.product_id = p.id WHERE p.sku = '{sku}'",
                )
            }
            assert {r.position for r in result.item_results} == own_positions
            for item in result.item_results:
                assert_same(as_tuples(item.results), reference(shop, sku, k, item.position))
                assert all(h.crop_box == (1.0, 2.0, 30.0, 40.0) for h in item.results)
            # the product itself never comes back, and k=100 > 29 others returns all others
            assert all(h.sku != sku for h in result.image_results)
            assert len(result.image_results) == min(k, 29)
    finally:
        catalog.close()


def test_position_and_filters(shop: Path) -> None:
    catalog = open_catalog(shop)
    try:
        sku = next(s for s in ("p00", "p01", "p02", "p03") if reference(shop, s, 1, "upper"))
        result = similar_products(catalog, sku, 5, position="upper")
        assert result.image_results == []  # a position asks for item-based results only
        assert [r.position for r in result.item_results] == ["upper"]
        assert_same(as_tuples(result.item_results[0].results), reference(shop, sku, 5, "upper"))

        filters = ProductFilter(category="skirts", min_price=12, max_price=30)
        meta = {
            pid: (cat, price)
            for pid, cat, price in db_rows(shop, "SELECT id, category, price FROM products")
        }

        def accept(pid: int) -> bool:
            cat, price = meta[pid]
            return cat == "skirts" and price is not None and 12 <= price <= 30

        filtered = similar_products(catalog, sku, 4, filters=filters)
        assert_same(as_tuples(filtered.image_results), reference(shop, sku, 4, accept=accept))
        assert filtered.image_results and all(accept(h.product_id) for h in filtered.image_results)
    finally:
        catalog.close()


def test_lookup_by_id_and_errors(shop: Path) -> None:
    catalog = open_catalog(shop)
    try:
        pid = product_ids(shop)["p05"]
        by_id = similar_products(catalog, pid, 3)
        by_sku = similar_products(catalog, "p05", 3)
        assert by_id.image_results == by_sku.image_results
        assert similar_products(catalog, str(pid), 3).image_results == by_sku.image_results
        with pytest.raises(CatalogError, match="no product"):
            similar_products(catalog, "nope", 3)
        with pytest.raises(CatalogError, match="no product"):
            similar_products(catalog, 10**6, 3)
        with pytest.raises(ConfigError, match="k must be"):
            similar_products(catalog, "p05", 0)
        with pytest.raises(CatalogError, match="no garment crop at position 'hat'"):
            similar_products(catalog, "p05", 3, position="hat")
    finally:
        catalog.close()


def test_sees_other_writers_and_deleted_products(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    writer = new_catalog(directory)
    reader = open_catalog(directory)
    try:
        rng = np.random.default_rng(0)
        base = unit(rng)[0]
        add_image(writer, "a", base)
        add_image(writer, "far", -base)
        assert [h.sku for h in similar_products(reader, "a", 5).image_results] == ["far"]
        add_image(writer, "twin", base)  # committed by another Catalog object
        # a host that refreshes under its own lock sees it only after its refresh
        stale = similar_products(reader, "a", 5, refresh=False).image_results
        assert [h.sku for h in stale] == ["far"]
        hits = similar_products(reader, "a", 5).image_results
        assert [h.sku for h in hits] == ["twin", "far"]
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        writer.remove_product(product_ids(directory)["twin"])
        assert [h.sku for h in similar_products(reader, "a", 5).image_results] == ["far"]
    finally:
        reader.close()
        writer.close()


def test_api_and_cli(shop: Path) -> None:
    via_api = api.similar(shop, "p07", k=4)
    want = reference(shop, "p07", 4)
    assert_same(as_tuples(via_api.image_results), want)

    runner = CliRunner()
    result = runner.invoke(app, ["similar", "p07", "--catalog", str(shop), "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [h["product_id"] for h in data["image_results"]] == [w[0] for w in want]
    table = runner.invoke(app, ["similar", "p07", "--catalog", str(shop), "-k", "4"])
    assert table.exit_code == 0 and "p07" in table.stdout
    missing = runner.invoke(app, ["similar", "nope", "--catalog", str(shop)])
    assert missing.exit_code == 1 and "no product" in missing.stderr
