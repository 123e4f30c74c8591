"""Near-duplicates against an all-pairs brute force; the CSV, the page and the CLI."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shop_helpers import add_image, fill_shop, near, new_catalog, stored, stored_file, unit
from typer.testing import CliRunner

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.cli import app
from snapshop.duplicates import CSV_COLUMNS, find_duplicates
from snapshop.errors import ConfigError


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shop whose products' images resemble each other, plus copies listed elsewhere:
    near-copies of three images under other products, and one image copied 12 times."""
    directory = tmp_path_factory.mktemp("duplicates") / "cat"
    catalog = new_catalog(directory)
    try:
        fill_shop(catalog, 20, seed=5)
        rng = np.random.default_rng(8)
        entries = stored(directory, "images")
        for n, image_id in enumerate(sorted(entries)[:3]):
            add_image(catalog, f"copy{n}", near(rng, entries[image_id][1], 0.05))
        popular = unit(rng)[0]
        for n in range(12):
            add_image(catalog, f"popular{n}", near(rng, popular, 0.005))
    finally:
        catalog.close()
    return directory


def reference(catalog_dir: Path, threshold: float) -> list[tuple[int, int, float]]:
    entries = stored(catalog_dir, "images")
    pairs = []
    for a, b in itertools.combinations(sorted(entries), 2):
        (pa, va), (pb, vb) = entries[a], entries[b]
        score = float(va @ vb)
        if pa != pb and score >= threshold:
            pairs.append((a, b, score))
    return sorted(pairs, key=lambda t: (-t[2], t[0], t[1]))


@pytest.mark.parametrize("threshold", [0.6, 0.9, 0.99])
@pytest.mark.parametrize("neighbours", [1, 16])
def test_pairs_match_brute_force(shop: Path, threshold: float, neighbours: int) -> None:
    catalog = open_catalog(shop)
    try:
        report = find_duplicates(catalog, threshold, neighbours=neighbours, batch_size=7)
    finally:
        catalog.close()
    want = reference(shop, threshold)
    assert [(p.image_id, p.other_image_id) for p in report.pairs] == [w[:2] for w in want]
    assert np.allclose([p.score for p in report.pairs], [w[2] for w in want], atol=1e-5)
    assert all(p.product_id != p.other_product_id for p in report.pairs)
    if threshold == 0.99:  # the image copied 12 times: every pair of copies, even with k=1
        assert sum(p.sku.startswith("popular") for p in report.pairs) == 12 * 11 // 2
    assert report.images == len(stored(shop, "images"))


def test_same_product_pairs_are_not_duplicates(tmp_path: Path) -> None:
    catalog = new_catalog(tmp_path / "cat")
    try:
        vec = unit(np.random.default_rng(0))[0]
        add_image(catalog, "a", vec, sha256="1" * 64)
        add_image(catalog, "a", vec, sha256="2" * 64)  # the same photo twice in one product
        assert find_duplicates(catalog, 0.5).pairs == []
        add_image(catalog, "b", vec)
        assert len(find_duplicates(catalog, 0.5).pairs) == 2  # b with each of a's images
        with pytest.raises(ConfigError, match="threshold"):
            find_duplicates(catalog, 1.5)
    finally:
        catalog.close()


def test_csv_html_and_cli(tmp_path: Path) -> None:
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        rng = np.random.default_rng(1)
        vec = unit(rng)[0]
        blob, sha = stored_file(directory, Image.new("RGB", (60, 40), (200, 30, 30)))
        add_image(catalog, "<script>x</script>", vec, blob=blob, sha256=sha)
        add_image(catalog, "relisted", near(rng, vec, 0.01))  # no stored file
        add_image(catalog, "other", unit(rng)[0])
    finally:
        catalog.close()

    report = api.duplicates(
        directory, threshold=0.9, out=tmp_path / "d.csv", html=tmp_path / "d.html"
    )
    assert len(report.pairs) == 1
    with open(tmp_path / "d.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert {rows[0]["sku"], rows[0]["other_sku"]} == {"<script>x</script>", "relisted"}
    page = (tmp_path / "d.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 1  # the stored file, inlined
    assert "no stored file" in page
    assert "<script>" not in page and "&lt;script&gt;" in page

    runner = CliRunner()
    args = ["catalog", "duplicates", "-c", str(directory), "--out", str(tmp_path / "c.csv")]
    result = runner.invoke(app, [*args, "--threshold", "0.9"])
    assert result.exit_code == 0, result.output
    assert "1 near-duplicate pairs among 3 images" in result.stdout
    data = json.loads(runner.invoke(app, [*args, "--threshold", "-1", "--json"]).stdout)
    assert len(data["pairs"]) == 3  # every cross-product pair
    bad = runner.invoke(app, [*args, "--threshold", "2"])
    assert bad.exit_code == 2


def test_pixel_check_keeps_edited_copies_and_drops_lookalikes(tmp_path: Path) -> None:
    """Every image has the same vector, so vectors alone call every pair a duplicate; the
    stored files tell a re-encoded, resized, cropped copy from another product's photo."""
    from snapshop.demo import demo_products, render

    first, second = demo_products(2, seed=3)
    photo = render(first, seed=1, size=200)
    w, h = photo.size
    copies = {
        "original": (photo, 90),
        "smaller-worse": (photo.resize((100, 100)), 30),
        "cropped": (photo.crop((w // 10, h // 10, w - w // 10, h - h // 10)), 90),
        "other": (render(second, seed=2, size=200), 90),
    }
    directory = tmp_path / "cat"
    catalog = new_catalog(directory)
    try:
        vec = unit(np.random.default_rng(0))[0]
        for sku, (image, quality) in copies.items():
            blob, sha = stored_file(directory, image, quality=quality)
            add_image(catalog, sku, vec, blob=blob, sha256=sha)
        unchecked = find_duplicates(catalog, 0.9, pixel_threshold=None)
        checked = find_duplicates(catalog, 0.9)
    finally:
        catalog.close()
    assert len(unchecked.pairs) == 6 and all(p.pixel_score is None for p in unchecked.pairs)
    kept = {frozenset((p.sku, p.other_sku)) for p in checked.pairs}
    copies = ("original", "smaller-worse", "cropped")
    assert kept == {frozenset(pair) for pair in itertools.combinations(copies, 2)}
    assert all(p.pixel_score is not None and p.pixel_score >= 0.9 for p in checked.pairs)
