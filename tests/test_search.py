"""Search against a brute-force numpy reference over the catalog's stored vectors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_helpers import write_csv

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.demo import demo_products, render
from snapshop.detect.base import Box
from snapshop.errors import ConfigError, ImageDecodeError, ModelError
from snapshop.ingest import Ingestor
from snapshop.models.card import CARD_FILE
from snapshop.models.embedder import Embedder
from snapshop.search import ProductFilter, Searcher, top_products

CROWD = 20  # images of the product the queries resemble most


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, lite0_model_dir: Path) -> dict[str, Any]:
    """8 products; product 0 has CROWD near-identical photos, the others 2 each."""
    root = tmp_path_factory.mktemp("search")
    products = demo_products(8, seed=7)
    rows: list[list[object]] = []
    for n, product in enumerate(products):
        for j in range(CROWD if n == 0 else 2):
            path = root / "images" / f"{product.sku}-{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            render(product, seed=1000 * n + j, size=64).save(path, quality=90)
            category = "upper" if n % 2 == 0 else "lower"
            rows.append([product.sku, path, product.title, "", 10.0 * (n + 1), category])
    csv_path = write_csv(root / "shop.csv", rows)
    api.index_source(csv_path, root / "cat", model=str(lite0_model_dir))
    queries = [root / f"query-{n}.jpg" for n in range(3)]
    for n, q in enumerate(queries):
        render(products[0 if n == 0 else n], seed=999_999 + n, size=64).save(q)
    return {"catalog": root / "cat", "products": products, "queries": queries, "root": root}


@pytest.fixture(scope="module")
def searcher(shop: dict[str, Any], lite0_embedder: Embedder):
    catalog = open_catalog(shop["catalog"])
    yield Searcher(catalog, lite0_embedder, None)
    catalog.close()


def reference(
    searcher: Searcher, query: Path, k: int, accept: Any = None
) -> list[tuple[int, float, int]]:
    """Brute force: cosine against every stored image vector, best image per product."""
    store = searcher.catalog.store
    ids, vecs = [], []
    for batch_ids, batch_vecs in store.iter_vectors("images", searcher.catalog.dim):
        ids += batch_ids.tolist()
        vecs.append(batch_vecs)
    matrix = np.concatenate(vecs)
    from snapshop.images import load_image

    q = searcher.embedder.embed_images([load_image(query)])[0]
    scores = matrix @ q
    owner = store.image_product_map(ids)
    best: dict[int, tuple[float, int]] = {}
    for image_id, score in zip(ids, scores, strict=True):
        product = owner[image_id]
        if accept is not None and not accept(store.get_product(product)):
            continue
        if product not in best or score > best[product][0]:
            best[product] = (float(score), image_id)
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
    return [(p, s, i) for p, (s, i) in ranked]


def as_tuples(result) -> list[tuple[int, float, int]]:
    return [(h.product_id, h.score, h.image_id) for h in result.image_results]


def assert_matches(got: list[tuple[int, float, int]], want: list[tuple[int, float, int]]) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2] for g in got] == [w[2] for w in want]
    assert np.allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(got, got[1:], strict=False))  # ordered


@pytest.mark.parametrize("k", [1, 3, 8, 50])
def test_matches_brute_force(shop: dict[str, Any], searcher: Searcher, k: int) -> None:
    for query in shop["queries"]:
        result = searcher.search(query, k)
        want = reference(searcher, query, k)
        assert_matches(as_tuples(result), want)
        assert len(result.image_results) == min(k, 8)
        assert len({h.product_id for h in result.image_results}) == len(result.image_results)


def test_crowded_product_does_not_hide_others(shop: dict[str, Any], searcher: Searcher) -> None:
    query = shop["queries"][0]
    index = searcher.catalog.index(None)
    hits = index.search(searcher.embedder.embed_images([searcher_image(query)]), 16)
    owners = searcher.catalog.store.image_product_map(hits.ids[0].tolist())
    crowd = searcher.catalog.store.find_product(shop["products"][0].sku)
    assert crowd is not None
    assert sum(owners[int(i)] == crowd.id for i in hits.ids[0]) >= 12  # the top is crowded
    result = searcher.search(query, 4)
    assert result.image_results[0].product_id == crowd.id
    assert len(result.image_results) == 4  # found by fetching deeper than the first 16


def searcher_image(path: Path):
    from snapshop.images import load_image

    return load_image(path)


def test_top_products_fetches_deeper_until_k_products() -> None:
    from snapshop.index.flat import FlatIndex

    index = FlatIndex(2)
    vecs = np.array([[1, 0]] * 30 + [[0.6, 0.8], [0, 1]], dtype=np.float32)
    index.add(np.arange(32), vecs)
    owner = {i: 0 for i in range(30)} | {30: 1, 31: 2}
    query = np.array([1, 0], np.float32)

    def owner_of(ids: list[int]) -> dict[int, int]:
        return {i: owner[i] for i in ids}

    found = top_products(index, query, 3, owner_of)
    assert [f[0] for f in found] == [0, 1, 2]
    assert found[1][2] == 30 and found[1][1] == pytest.approx(0.6)
    only_odd = top_products(index, query, 3, owner_of, accept=lambda p: p != 1)
    assert [f[0] for f in only_odd] == [0, 2]


@pytest.mark.parametrize(
    "filters",
    [
        ProductFilter(category="lower"),
        ProductFilter(min_price=25, max_price=60),
        ProductFilter(category="upper", max_price=50),
        ProductFilter(category="no-such-category"),
    ],
)
def test_filters_match_brute_force(
    shop: dict[str, Any], searcher: Searcher, filters: ProductFilter
) -> None:
    query = shop["queries"][1]
    result = searcher.search(query, 5, filters=filters)
    want = reference(searcher, query, 5, accept=filters.accepts)
    assert_matches(as_tuples(result), want)
    for hit in result.image_results:
        assert filters.category is None or hit.category == filters.category
        assert filters.min_price is None or hit.price >= filters.min_price
        assert filters.max_price is None or hit.price <= filters.max_price


def test_hit_fields_and_timings(shop: dict[str, Any], searcher: Searcher) -> None:
    result = searcher.search(shop["queries"][2], 3)
    top = result.image_results[0]
    product = shop["products"][2]
    assert top.sku == product.sku and top.title == product.title and top.price == 30.0
    image = searcher.catalog.store.get_image(top.image_id)
    assert image.product_id == top.product_id
    assert set(result.timings_ms) >= {"decode", "detect", "embed", "search", "total"}
    assert all(v >= 0 for v in result.timings_ms.values())
    data = json.loads(json.dumps(result.to_dict()))
    assert data["image_results"][0]["sku"] == product.sku
    assert result.query_size == (64, 64)


def test_query_as_bytes_and_pil_gives_same_result(shop: dict[str, Any], searcher: Searcher) -> None:
    path = shop["queries"][1]
    by_path = as_tuples(searcher.search(path, 5))
    by_bytes = as_tuples(searcher.search(path.read_bytes(), 5))
    by_pil = as_tuples(searcher.search(searcher_image(path), 5))
    assert by_path == by_bytes == by_pil


def test_bad_queries(shop: dict[str, Any], searcher: Searcher, tmp_path: Path) -> None:
    for k in (0, -1, 1001):
        with pytest.raises(ConfigError):
            searcher.search(shop["queries"][0], k)
    with pytest.raises(ImageDecodeError, match="not an image"):
        searcher.search(b"<html></html>", 3)
    with pytest.raises(ImageDecodeError, match="not found"):
        searcher.search(tmp_path / "missing.jpg", 3)
    with pytest.raises(ConfigError):
        ProductFilter(min_price=5, max_price=1)
    with pytest.raises(ConfigError):
        ProductFilter(min_price=float("nan"))
    with pytest.raises(ConfigError, match="box"):
        searcher.search(shop["queries"][0], 3, box=Box(0, 0, 3, 3))


def test_box_search_without_crop_indexes(shop: dict[str, Any], searcher: Searcher) -> None:
    result = searcher.search(shop["queries"][0], 3, box=Box(0, 0, 40, 40))
    assert result.image_results == []  # a box search is item-based only
    assert len(result.item_results) == 1 and result.item_results[0].results == []


def test_catalog_refuses_other_model(
    shop: dict[str, Any], lite0_model_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(lite0_model_dir, other)
    card = json.loads((other / CARD_FILE).read_text())
    card["name"] = "retrained_lite0"
    (other / CARD_FILE).write_text(json.dumps(card))
    embedder_b = Embedder(other)
    catalog = open_catalog(shop["catalog"])
    try:
        assert embedder_b.model_id != catalog.model_id
        with pytest.raises(ModelError, match="built with model"):
            Searcher(catalog, embedder_b)
        with pytest.raises(ModelError):
            Ingestor(catalog, embedder_b)
    finally:
        catalog.close()
    with pytest.raises(ModelError):
        api.open_searcher(shop["catalog"], model=str(other))
    with pytest.raises(ModelError):
        api.search_image(shop["queries"][0], shop["catalog"], model=str(other))
    generation = open_catalog(shop["catalog"])
    try:
        before = generation.store.generation
    finally:
        generation.close()
    with pytest.raises(ModelError):
        api.index_source(shop["root"] / "shop.csv", shop["catalog"], model=str(other))
    catalog = open_catalog(shop["catalog"])
    try:
        assert catalog.store.generation == before
    finally:
        catalog.close()


def test_search_image_api(shop: dict[str, Any], searcher: Searcher) -> None:
    buf = io.BytesIO()
    searcher_image(shop["queries"][2]).save(buf, "PNG")
    result = api.search_image(buf.getvalue(), shop["catalog"], k=2)
    assert result.image_results[0].sku == shop["products"][2].sku


def test_auto_refresh_picks_up_other_writers(
    shop: dict[str, Any], lite0_model_dir: Path, lite0_embedder: Embedder, tmp_path: Path
) -> None:
    cat = tmp_path / "cat"
    shutil.copytree(shop["catalog"], cat)
    query = shop["queries"][1]
    catalog = open_catalog(cat)
    try:
        searcher = Searcher(catalog, lite0_embedder)
        searcher.auto_refresh = False  # the host refreshes under its own lock
        rows = [["new-sku", query, "The query itself", "", "", ""]]
        api.index_source(write_csv(tmp_path / "new.csv", rows), cat, model=str(lite0_model_dir))
        assert "new-sku" not in {h.sku for h in searcher.search(query, 10).image_results}
        searcher.auto_refresh = True
        top = searcher.search(query, 10).image_results[0]
        assert top.sku == "new-sku" and top.score > 0.999
    finally:
        catalog.close()
