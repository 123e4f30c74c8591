"""benchmarks/catalog_views_pipeline.py runs end to end on a tiny generated dataset."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from script_helpers import load_script
from test_catalog_views import cluttered_photo, packshot_image

load_script("benchmarks/catalog_levers.py")  # imported by the script as its neighbour
pipeline = load_script("benchmarks/catalog_views_pipeline.py")


def test_pipeline_benchmark_prints_every_setting_and_the_costs(
    tmp_path: Path, lite0_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = []
    for n in range(6):  # per product: a packshot (catalog), two photos, two queries
        folder = tmp_path / "images" / f"p{n}"
        folder.mkdir(parents=True)
        packshot_image(n).save(folder / "catalog.png")
        rows.append((folder / "catalog.png", f"p{n}", "gallery", "iconic"))
        for i in range(4):
            cluttered_photo(10 * n + i).save(folder / f"photo{i}.png")
            role = "gallery" if i < 2 else "query"
            rows.append((folder / f"photo{i}.png", f"p{n}", role, "natural"))
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "product_id", "role", "domain"])
        writer.writerows((str(p), sku, role, domain) for p, sku, role, domain in rows)
    assert pipeline.main([str(manifest), "--views", "2", "--model", str(lite0_model_dir),
                          "--work", str(tmp_path / "work"), "--verify"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "3 folds, 6 products, 12 queries; 6 of 6 catalog images taken for packshots" in out
    settings = ("baseline", "query flip", "catalog views 2", "catalog views 2 + query flip")
    for setting in (*settings, "verify"):
        assert f"| {setting} | " in out
    assert "| baseline | " in out and "+0.000 [+0.000, +0.000]" in out
    assert "2 catalog views:" in out and "  query flip: " in out and "  verify: " in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    # one model per fold (here the same one three times): the same table
    folds = [str(lite0_model_dir)] * 3
    argv = [str(manifest), "--views", "2", "--work", str(tmp_path / "work"), "--verify"]
    assert pipeline.main([*argv, "--fold-models", *folds]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")] == table
    with pytest.raises(SystemExit):  # one directory per fold
        pipeline.main([*argv, "--fold-models", *folds[:2]])
    assert "--fold-models needs 3 directories" in capsys.readouterr().err
