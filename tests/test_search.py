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
    """The default searcher: image-based results ranked by product vector."""
    catalog = open_catalog(shop["catalog"])
    yield Searcher(catalog, lite0_embedder, None)
    catalog.close()


@pytest.fixture(scope="module")
def image_searcher(searcher: Searcher) -> Searcher:
    """Image-based results ranked by each product's best image (``ranking="image"``)."""
    return Searcher(searcher.catalog, searcher.embedder, None, ranking="image")


def ranked_reference(
    searcher: Searcher, q: np.ndarray, k: int, accept: Any, ranking: str
) -> list[tuple[int, float, int]]:
    """Brute force over the stored image vectors: [(product, score, best image)], best first.

    ``ranking="image"``: a product scores its best image. ``"product"``: it scores the inner
    product with the mean of its L2-normalised image vectors, renormalised; the image shown
    is still its best one."""
    store = searcher.catalog.store
    ids, vecs = [], []
    for batch_ids, batch_vecs in store.iter_vectors("images", searcher.catalog.dim):
        ids += batch_ids.tolist()
        vecs.append(batch_vecs)
    if not ids:
        return []
    matrix = np.concatenate(vecs)
    scores = matrix @ q
    owner = store.image_product_map(ids)
    best: dict[int, tuple[float, int]] = {}
    rows: dict[int, list[np.ndarray]] = {}
    for image_id, score, vec in zip(ids, scores, matrix, strict=True):
        product = owner[image_id]
        if accept is not None and not accept(store.get_product(product)):
            continue
        rows.setdefault(product, []).append(vec / np.linalg.norm(vec))
        # ids arrive in order and ties go to the lower id; scores of equal vectors may differ
        # in the last bit by where the matrix product put them, so a tie is within 1e-6
        if product not in best or score > best[product][0] + 1e-6:
            best[product] = (float(score), image_id)
    if ranking == "product":
        for product, unit_rows in rows.items():
            mean = np.mean(unit_rows, axis=0)
            best[product] = (float(mean @ q / np.linalg.norm(mean)), best[product][1])
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
    return [(p, s, i) for p, (s, i) in ranked]


def reference(
    searcher: Searcher, query: Path, k: int, accept: Any = None, ranking: str = "image"
) -> list[tuple[int, float, int]]:
    """Brute force for the photo ``query`` (see :func:`ranked_reference`)."""
    from snapshop.images import load_image

    q = searcher.embedder.embed_images([load_image(query)])[0]
    return ranked_reference(searcher, q, k, accept, ranking)


def as_tuples(result) -> list[tuple[int, float, int]]:
    return [(h.product_id, h.score, h.image_id) for h in result.image_results]


def assert_matches(got: list[tuple[int, float, int]], want: list[tuple[int, float, int]]) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2] for g in got] == [w[2] for w in want]
    assert np.allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(got, got[1:], strict=False))  # ordered


@pytest.mark.parametrize("ranking", ["product", "image"])
@pytest.mark.parametrize("k", [1, 3, 8, 50])
def test_matches_brute_force(
    shop: dict[str, Any], searcher: Searcher, image_searcher: Searcher, k: int, ranking: str
) -> None:
    chosen = searcher if ranking == "product" else image_searcher
    assert chosen.ranking == ranking
    for query in shop["queries"]:
        result = chosen.search(query, k)
        want = reference(chosen, query, k, ranking=ranking)
        assert_matches(as_tuples(result), want)
        assert len(result.image_results) == min(k, 8)
        assert len({h.product_id for h in result.image_results}) == len(result.image_results)


def test_product_ranking_differs_from_best_image(
    shop: dict[str, Any], searcher: Searcher, image_searcher: Searcher
) -> None:
    """The two rankings are not the same thing: their scores differ on this shop (so the
    brute-force tests above tell them apart)."""
    for query in shop["queries"]:
        by_product = as_tuples(searcher.search(query, 8))
        by_image = as_tuples(image_searcher.search(query, 8))
        assert {p for p, _, _ in by_product} == {p for p, _, _ in by_image}  # all 8 products
        best_image = {p: i for p, _, i in by_image}
        assert all(best_image[p] == i for p, _, i in by_product)  # the same image shown
        score_of = {p: s for p, s, _ in by_image}
        assert any(abs(s - score_of[p]) > 1e-3 for p, s, _ in by_product)


def test_crowded_product_does_not_hide_others(
    shop: dict[str, Any], image_searcher: Searcher
) -> None:
    searcher = image_searcher
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
@pytest.mark.parametrize("ranking", ["product", "image"])
def test_filters_match_brute_force(
    shop: dict[str, Any], searcher: Searcher, filters: ProductFilter, ranking: str
) -> None:
    query = shop["queries"][1]
    searcher = Searcher(searcher.catalog, searcher.embedder, None, ranking=ranking)
    result = searcher.search(query, 5, filters=filters)
    want = reference(searcher, query, 5, accept=filters.accepts, ranking=ranking)
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


def test_catalog_refuses_its_model_resized(
    shop: dict[str, Any], lite0_model_dir: Path, tmp_path: Path
) -> None:
    """The same weights at another input size are another embedding space (the README's
    `resize-model`: index again): searching with the copy is refused in one line."""
    from snapshop.models.export import resize_model

    resized = tmp_path / "lite0-288"
    resize_model(lite0_model_dir, 288, resized)
    with pytest.raises(ModelError, match="built with model"):
        api.open_searcher(shop["catalog"], model=str(resized))


def test_a_model_merged_with_itself_searches_as_the_model(
    shop: dict[str, Any], lite0_model_dir: Path, tmp_path: Path
) -> None:
    """`merge-models A A`: each vector is A's twice over sqrt 2, so every score and rank is A's;
    the catalog indexed with it holds vectors twice as wide and refuses A itself."""
    from snapshop.models.ensemble import merge_models

    merged = tmp_path / "a+a"
    merge_models([lite0_model_dir, lite0_model_dir], merged)
    cat = tmp_path / "cat"
    api.index_source(shop["root"] / "shop.csv", cat, model=str(merged))
    for query in shop["queries"]:
        want = api.search_image(query, shop["catalog"], k=5).image_results
        got = api.search_image(query, cat, k=5).image_results
        assert [h.sku for h in got] == [h.sku for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-3)
    with pytest.raises(ModelError, match="built with model"):
        api.open_searcher(cat, model=str(lite0_model_dir))


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


def test_square_pad_scales_a_long_crop_down_before_padding() -> None:
    """A 10 x 40,000 crop padded as it is would need a 40,000^2 canvas (4.8 GB)."""
    from PIL import Image

    from snapshop.detect.base import MAX_PAD_SIDE, frame_crop, square_pad

    strip = Image.new("RGB", (10, 40_000), (200, 10, 10))
    padded = square_pad(strip)
    assert padded.size == (MAX_PAD_SIDE, MAX_PAD_SIDE)
    assert padded.getpixel((MAX_PAD_SIDE // 2, MAX_PAD_SIDE // 2)) == (200, 10, 10)
    framed = frame_crop(strip, Box(0, 0, 10, 40_000), "pad")
    assert framed is not None and framed.size == (MAX_PAD_SIDE, MAX_PAD_SIDE)
    assert square_pad(Image.new("RGB", (300, 100)), max_side=120).size == (120, 120)


def test_square_pad_keeps_the_whole_garment() -> None:
    from PIL import Image

    from snapshop.detect.base import frame_crop, square_pad

    tall = Image.new("RGB", (10, 30), (200, 10, 10))
    tall.paste((0, 0, 250), (0, 0, 10, 3))  # a blue waistband the centre crop would cut off
    padded = square_pad(tall)
    assert padded.size == (30, 30)
    assert padded.crop((10, 0, 20, 30)).tobytes() == tall.tobytes()  # centred, untouched
    fill = padded.getpixel((0, 15))
    assert fill == tuple(round(c) for c in np.asarray(tall, np.float64).reshape(-1, 3).mean(0))
    assert square_pad(Image.new("RGB", (9, 9))).size == (9, 9)
    wide = frame_crop(Image.new("RGB", (100, 100)), Box(10, 40, 90, 60), "pad")
    assert wide is not None and wide.size == (80, 80)
    center = frame_crop(Image.new("RGB", (100, 100)), Box(10, 40, 90, 60), "center")
    assert center is not None and center.size == (80, 20)
    with pytest.raises(ConfigError, match="crop mode"):
        frame_crop(tall, Box(0, 0, 5, 5), "stretch")


def test_catalog_and_query_crops_are_framed_alike(tmp_path: Path, lite0_model_dir: Path) -> None:
    """New catalogs pad crops to squares at ingest and at search; a catalog card from before
    the mode existed keeps embedding them as they are, on both sides."""
    from service_fixtures import FixedGarmentDetector

    from snapshop.catalog.catalog import CARD_FILE as CATALOG_CARD
    from snapshop.catalog.catalog import create_catalog
    from snapshop.detect.base import frame_crop
    from snapshop.errors import CatalogError

    images = []
    for n, product in enumerate(demo_products(3, seed=11)):
        path = tmp_path / f"{product.sku}.jpg"
        render(product, seed=n, size=96).save(path, quality=95)
        images.append([product.sku, path, product.title, "", 10.0, ""])
    manifest = write_csv(tmp_path / "shop.csv", images)
    embedder = Embedder(lite0_model_dir)
    detector = FixedGarmentDetector()
    from PIL import Image

    for mode in ("pad", "center"):
        cat = tmp_path / f"cat-{mode}"
        if mode == "center":  # an older catalog: its card has no crop_mode
            create_catalog(
                cat, model_id=embedder.model_id, model_ref=str(lite0_model_dir), dim=embedder.dim
            ).close()
            card = json.loads((cat / CATALOG_CARD).read_text())
            assert card.pop("crop_mode") == "pad"
            (cat / CATALOG_CARD).write_text(json.dumps(card))
        api.index_source(manifest, cat, model=str(lite0_model_dir), detector=detector)
        catalog = open_catalog(cat)
        try:
            assert catalog.crop_mode == mode and catalog.info()["crop_mode"] == mode
            first = Image.open(images[0][1]).convert("RGB")
            lower = detector.detect(first)[1].box
            stored = np.concatenate(
                [v for _, v in catalog.store.iter_vectors("crops", catalog.dim, position="lower")]
            )
            expected = embedder.embed_images([frame_crop(first, lower, mode)])[0]
            other = embedder.embed_images(
                [frame_crop(first, lower, "pad" if mode == "center" else "center")]
            )[0]
            assert float((stored @ expected).max()) > 0.999
            assert float((stored @ other).max()) < 0.999
            result = Searcher(catalog, embedder, detector).search(first, k=1)
            lower_hits = [r for r in result.item_results if r.position == "lower"][0].results
            assert lower_hits[0].sku == images[0][0] and lower_hits[0].score > 0.999
        finally:
            catalog.close()
    card = json.loads((cat / CATALOG_CARD).read_text())
    (cat / CATALOG_CARD).write_text(json.dumps({**card, "crop_mode": "stretch"}))
    broken = open_catalog(cat)
    try:
        with pytest.raises(CatalogError, match="crop_mode"):
            _ = broken.crop_mode
    finally:
        broken.close()


# --- ranking on generated catalogs of bare vectors, against numpy -----------------------------
class VectorQuery:
    """Stands in for the embedder of a toy catalog: every photo embeds to ``self.vector``."""

    def __init__(self, model_id: str, vector: np.ndarray) -> None:
        self.model_id = model_id
        self.vector = np.asarray(vector, np.float32)

    def submit(self, image: Any) -> Any:
        from concurrent.futures import Future

        done: Future = Future()
        done.set_result(self.vector[None, :])
        return done

    def embed_images(self, images: list[Any]) -> np.ndarray:
        return np.tile(self.vector, (len(images), 1))


def photo() -> Any:
    from PIL import Image

    return Image.new("RGB", (32, 32), (120, 80, 40))


def toy_searcher(catalog: Any, ranking: str = "product") -> Searcher:
    query = VectorQuery(catalog.model_id, np.zeros(catalog.dim, np.float32))
    return Searcher(catalog, query, None, ranking=ranking)  # type: ignore[arg-type]


def search_vector(searcher: Searcher, q: np.ndarray, k: int, **kw: Any) -> list[tuple]:
    searcher.embedder.vector = q.astype(np.float32)  # type: ignore[attr-defined]
    return as_tuples(searcher.search(photo(), k, **kw))


@pytest.fixture(scope="module")
def toy_shop(tmp_path_factory: pytest.TempPathFactory):
    """30 products of 1-4 images, with categories and prices (shop_helpers.fill_shop)."""
    from shop_helpers import fill_shop, new_catalog

    catalog = new_catalog(tmp_path_factory.mktemp("toy") / "cat")
    fill_shop(catalog, 30, seed=3)
    yield catalog
    catalog.close()


GENERATED_FILTERS = [
    None,
    ProductFilter(category="tops"),
    ProductFilter(min_price=15, max_price=30),
    ProductFilter(category="skirts", max_price=25),
    ProductFilter(category="no-such-category"),
]


@pytest.mark.parametrize("exact_scan", [True, False])
@pytest.mark.parametrize("filters", GENERATED_FILTERS)
@pytest.mark.parametrize("ranking", ["product", "image"])
def test_generated_catalog_matches_numpy(
    toy_shop: Any, ranking: str, filters: ProductFilter | None, exact_scan: bool, monkeypatch
) -> None:
    """Top-k product ids, scores and shown images equal the numpy reference, with the filter
    scanned exactly over the allowed vectors or applied by faiss' selector during the scan."""
    from shop_helpers import unit

    if not exact_scan:
        monkeypatch.setattr("snapshop.index.flat.exact_filter_max", lambda dim: 0)
    searcher = toy_searcher(toy_shop, ranking)
    accept = filters.accepts if filters is not None else None
    rng = np.random.default_rng(11)
    for q in unit(rng, 6, toy_shop.dim):
        for k in (1, 7, 100):  # 100: more than the 30 products
            want = ranked_reference(searcher, q, k, accept, ranking)
            got = search_vector(searcher, q, k, filters=filters)
            assert_matches(got, want)
            assert len(got) == min(k, len(ranked_reference(searcher, q, 1000, accept, ranking)))
    if filters is not None and filters.category == "no-such-category":
        assert got == []


def test_generated_rankings_differ(toy_shop: Any) -> None:
    """On this catalog the two rankings order products differently (so the test above can
    tell a product ranking that fell back to best image)."""
    from shop_helpers import unit

    rng = np.random.default_rng(12)
    by_product, by_image = toy_searcher(toy_shop, "product"), toy_searcher(toy_shop, "image")
    orders = [(
        [p for p, _, _ in search_vector(by_product, q, 10)],
        [p for p, _, _ in search_vector(by_image, q, 10)],
    ) for q in unit(rng, 10, toy_shop.dim)]  # fmt: skip
    assert any(a != b for a, b in orders)


@pytest.mark.parametrize("ranking", ["product", "image"])
def test_catalog_without_products(tmp_path: Path, ranking: str) -> None:
    from shop_helpers import new_catalog, unit

    catalog = new_catalog(tmp_path / "cat")
    try:
        searcher = toy_searcher(catalog, ranking)
        q = unit(np.random.default_rng(0), 1, catalog.dim)[0]
        assert search_vector(searcher, q, 5) == []
        assert search_vector(searcher, q, 5, filters=ProductFilter(category="tops")) == []
    finally:
        catalog.close()


def test_product_ranking_follows_writes_without_reopening(tmp_path: Path) -> None:
    """An image added through ``catalog.writing()``, a product edit, the removal of every
    image of a product and of a product: the next search reflects each, against numpy."""
    from catalog_helpers import add_vectors
    from shop_helpers import new_catalog, unit

    catalog = new_catalog(tmp_path / "cat")
    try:
        rng = np.random.default_rng(21)
        for n in range(6):
            add_vectors(catalog, unit(rng, 3, catalog.dim), sku=f"s{n}", category="tops",
                        price=10.0 + n)  # fmt: skip
        searcher = toy_searcher(catalog)
        q = unit(rng, 1, catalog.dim)[0]

        def check(k: int = 10, filters: ProductFilter | None = None) -> list[tuple]:
            got = search_vector(searcher, q, k, filters=filters)
            want = ranked_reference(searcher, q, k, filters.accepts if filters else None,
                                    "product")  # fmt: skip
            assert_matches(got, want)
            return got

        before = check()
        assert len(before) == 6
        last = before[-1][0]
        with catalog.writing() as write:  # the query's own vector, as an image of the last
            image_id, _ = write.insert_image(last, source="new.jpg", blob=None, sha256="ab" * 32,
                                             width=4, height=4, vector=q)  # fmt: skip
        after = check()
        moved = {p: (s, i) for p, s, i in after}[last]
        assert moved[1] == image_id  # the new image is the one shown
        assert moved[0] > before[-1][1] + 0.1  # and the product vector moved toward the query

        catalog.update_product(last, category="skirts")
        assert [p for p, _, _ in check(filters=ProductFilter(category="skirts"))] == [last]
        assert last not in [p for p, _, _ in check(filters=ProductFilter(category="tops"))]

        emptied = before[0][0]
        catalog.remove_images([i.id for i in catalog.store.images_of(emptied)])
        assert catalog.store.products_by_ids([emptied])  # the product is still listed
        remaining = check(k=50)  # k larger than the number of products
        assert emptied not in [p for p, _, _ in remaining] and len(remaining) == 5

        catalog.remove_product(before[1][0])
        assert len(check(k=50)) == 4

        add_vectors(catalog, np.stack([q, q]), sku="other-writer")  # the store only, as
        top = check(k=50)[0]  # another process writes: no index knows it yet
        assert top[0] == catalog.find_product("other-writer").id and top[1] > 0.9999
    finally:
        catalog.close()


def test_ranking_switch_is_checked_everywhere(
    shop: dict[str, Any], searcher: Searcher, monkeypatch
) -> None:
    from snapshop.service.settings import RANKING_ENV, ServiceSettings

    with pytest.raises(ConfigError, match="ranking"):
        Searcher(searcher.catalog, searcher.embedder, ranking="best")
    with pytest.raises(ConfigError, match="ranking"):
        searcher.rank_products(np.zeros(searcher.catalog.dim, np.float32), 3, ranking="mean")
    with pytest.raises(ConfigError, match="ranking"):
        api.open_searcher(shop["catalog"], ranking="best")
    assert ServiceSettings(shop["catalog"]).ranking == "product"
    monkeypatch.setenv(RANKING_ENV, "image")
    assert ServiceSettings(shop["catalog"]).ranking == "image"
    monkeypatch.setenv(RANKING_ENV, "nearest")
    with pytest.raises(ConfigError, match="ranking"):
        ServiceSettings(shop["catalog"])


def test_service_ranks_as_its_setting_says(shop: dict[str, Any], searcher: Searcher) -> None:
    from fastapi.testclient import TestClient

    from snapshop.service.app import create_app
    from snapshop.service.settings import ServiceSettings

    query = shop["queries"][1]
    for ranking in ("product", "image"):
        served = Searcher(searcher.catalog, searcher.embedder, None)
        app = create_app(ServiceSettings(shop["catalog"], ranking=ranking), searcher=served)
        with TestClient(app) as client:
            response = client.post("/v1/search", files={"image": ("q.jpg", query.read_bytes())},
                                   data={"k": "5"})  # fmt: skip
        assert response.status_code == 200, response.text
        hits = response.json()["image_results"]
        want = reference(searcher, query, 5, ranking=ranking)
        assert [h["product_id"] for h in hits] == [w[0] for w in want]
        assert [h["image_id"] for h in hits] == [w[2] for w in want]
        assert np.allclose([h["score"] for h in hits], [w[1] for w in want], atol=1e-4)


def test_cli_ranking_option(shop: dict[str, Any], searcher: Searcher) -> None:
    from typer.testing import CliRunner

    from snapshop.cli import app

    query = shop["queries"][2]
    for ranking in ("product", "image"):
        args = ["search", str(query), "--catalog", str(shop["catalog"]), "-k", "4", "--json",
                "--ranking", ranking]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        hits = json.loads(result.stdout)["image_results"]
        want = reference(searcher, query, 4, ranking=ranking)
        assert [h["product_id"] for h in hits] == [w[0] for w in want]
        assert np.allclose([h["score"] for h in hits], [w[1] for w in want], atol=1e-4)
    bad = CliRunner().invoke(app, ["search", str(query), "--catalog", str(shop["catalog"]),
                                   "--ranking", "best"])  # fmt: skip
    assert bad.exit_code == 2 and "ranking must be one of" in bad.output  # a usage error
