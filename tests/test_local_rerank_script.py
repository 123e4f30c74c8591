"""benchmarks/local_rerank.py and benchmarks/view_levers.py run end to end on a tiny generated
dataset: cartons (catalog image + photos of it) and plain products."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from script_helpers import load_script
from test_catalog_views import cluttered_photo, packshot_image
from verify_helpers import package, photographed

rerank = load_script("benchmarks/local_rerank.py")  # view_levers imports it as its neighbour
levers = load_script("benchmarks/view_levers.py")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 products: 3 printed cartons, 3 plain ones; per product a catalog image, two gallery
    photos and two queries."""
    root = tmp_path_factory.mktemp("rerank")
    rows = []
    for n in range(6):
        folder = root / f"p{n}"
        folder.mkdir()
        packaged = n < 3
        (package(40 + n) if packaged else packshot_image(n)).save(folder / "catalog.png")
        rows.append((folder / "catalog.png", f"p{n}", "gallery", "iconic", int(packaged)))
        for i in range(4):
            photo = photographed(package(40 + n)) if packaged else cluttered_photo(10 * n + i)
            photo.save(folder / f"photo{i}.png")
            role = "gallery" if i < 2 else "query"
            rows.append((folder / f"photo{i}.png", f"p{n}", role, "natural", int(packaged)))
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "product_id", "role", "domain", "is_packaged_sku"])
        writer.writerows((str(p), *rest) for p, *rest in rows)
    return path


def test_rerank_benchmark_cross_fits_and_prints_both_protocols(
    manifest: Path, lite0_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--cache", str(tmp_path)]
    assert rerank.main([*argv, "--latency-queries", "3"]) == 0
    out = capsys.readouterr().out
    for protocol in ("photo -> catalog", "photo -> all"):
        for fold in range(3):
            assert re.search(rf"{protocol}, fold {fold}: weight [0-9.]+, floor \d+", out)
        assert f"{protocol}, packaged: 6 queries, R@1" in out
        assert f"{protocol}, produce: 6 queries, R@1" in out
    assert "| metric | cosine | verified (cross-fitted) |" in out
    assert "| R@1 - cosine, paired |" in out and "added per query (3 queries" in out
    assert (tmp_path / "verify.pkl").is_file()
    # the inlier cache gives the same tables the second time
    assert rerank.main([*argv, "--latency-queries", "0"]) == 0
    again = capsys.readouterr().out
    assert [ln for ln in again.splitlines() if ln.startswith("|")] == [
        ln for ln in out.splitlines() if ln.startswith("|")
    ]
    with pytest.raises(SystemExit):
        rerank.main([str(manifest)])  # neither --fold-models nor --baseline
    assert "give --fold-models or --baseline" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lever, views", [("piles", "2 pile views per catalog image"), ("crops", "5 crops per query")]
)
def test_view_lever_benchmark_prints_three_vectors(
    manifest: Path,
    lite0_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    lever: str,
    views: str,
) -> None:
    argv = [str(manifest), "--baseline", str(lite0_model_dir), "--lever", lever, "--views", "2"]
    assert levers.main(argv) == 0
    out = capsys.readouterr().out
    assert views in out
    assert "| metric | image | image + views | views only |" in out
    assert "photo -> catalog: 3 folds, 6 products, 12 queries, pooled" in out
    assert out.count("| R@1 - image, paired | - |") == 2


def test_view_crops_are_the_centre_and_the_corners() -> None:
    from PIL import Image

    image = Image.new("RGB", (100, 60))
    crops = levers.crops_of(image)
    assert [c.size for c in crops] == [(50, 30)] * 5
    pixels = Image.new("RGB", (4, 4))
    for x in range(4):
        for y in range(4):
            pixels.putpixel((x, y), (x, y, 0))
    corners = [c.getpixel((0, 0)) for c in levers.crops_of(pixels)]
    assert corners == [(1, 1, 0), (0, 0, 0), (2, 0, 0), (0, 2, 0), (2, 2, 0)]
