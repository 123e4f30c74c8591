"""The CLI: commands, JSON output, exit codes and one-line error messages."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from catalog_helpers import copy_catalog, make_images, shop_csv
from typer.testing import CliRunner

from snapshop.cli import app
from snapshop.demo import demo_products, render

runner = CliRunner()


def invoke(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result: Any, code: int, *words: str) -> str:
    """Exit ``code``, no traceback, exactly one line on stderr naming the problem."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, lite0_model_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli")
    images = make_images(root / "shop", n_products=3, per_product=2, size=64)
    csv_path = shop_csv(root / "shop.csv", images)
    result = invoke(
        "index", csv_path, "--catalog", root / "cat", "--model", lite0_model_dir, "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["added"], report["skipped"], report["products"]) == (6, 0, 3)
    query = root / "query.jpg"
    render(demo_products(3)[1], seed=4242, size=64).save(query)
    return {
        "root": root,
        "images": images,
        "csv": csv_path,
        "catalog": root / "cat",
        "query": query,
    }


@pytest.fixture()
def cat(built: dict[str, Any], tmp_path: Path) -> Path:
    return copy_catalog(built["catalog"], tmp_path / "cat")


def test_index_again_is_idempotent_text_output(built: dict[str, Any], cat: Path) -> None:
    result = invoke("index", built["csv"], "--catalog", cat)
    assert result.exit_code == 0, result.output
    assert "added 0 images" in result.stdout and "skipped 6" in result.stdout


def test_index_folder_reports_failures(built: dict[str, Any], cat: Path, tmp_path: Path) -> None:
    shop = tmp_path / "more"
    make_images(shop, n_products=1, per_product=1, size=64, seed=9)
    (next(shop.iterdir()) / "broken.jpg").write_text("<html>")
    result = invoke("index", shop, "--catalog", cat)
    assert result.exit_code == 1, result.output  # an image failed (issue #19)
    assert "added 1 images" in result.stdout and "1 failed" in result.stdout
    assert "broken.jpg" in result.stderr and "not an image" in result.stderr
    assert "failed" in result.stderr.split("broken.jpg")[0]
    # the real process (its logging goes to the terminal too) lists the file once
    exe = Path(sys.executable).parent / "snapshop"
    if exe.exists():
        again = shop / "p_again"
        again.mkdir()
        (again / "broken2.jpg").write_text("<html>")
        proc = subprocess.run(
            [str(exe), "index", str(shop), "--catalog", str(cat)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("broken2.jpg") == 1, proc.stderr


def test_index_only_failures_exits_non_zero(tmp_path: Path, lite0_model_dir: Path) -> None:
    (tmp_path / "shop" / "p1").mkdir(parents=True)
    (tmp_path / "shop" / "p1" / "a.jpg").write_bytes(b"")
    result = invoke(
        "index", tmp_path / "shop", "--catalog", tmp_path / "cat", "--model", lite0_model_dir
    )
    assert result.exit_code == 1
    assert "empty" in result.stderr


def test_search_json(built: dict[str, Any], cat: Path) -> None:
    result = invoke("search", built["query"], "--catalog", cat, "-k", 2, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    hits = data["image_results"]
    assert len(hits) == 2
    assert hits[0]["sku"] == demo_products(3)[1].sku
    assert hits[0]["score"] >= hits[1]["score"]
    assert {"decode", "embed", "search", "total"} <= set(data["timings_ms"])


def test_search_table_and_filters(built: dict[str, Any], cat: Path) -> None:
    result = invoke("search", built["query"], "--catalog", cat, "-k", 5)
    assert result.exit_code == 0, result.output
    assert demo_products(3)[1].sku in result.stdout and "ms" in result.stdout
    shape = demo_products(3)[0].shape
    result = invoke("search", built["query"], "--catalog", cat, "--category", shape, "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["image_results"]
    assert hits and all(h["category"] == shape for h in hits)


def test_catalog_info_and_remove(built: dict[str, Any], cat: Path) -> None:
    result = invoke("catalog", "info", "--catalog", cat, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["products"], info["images"], info["crops"]) == (3, 6, 0)
    assert info["model_id"].startswith("efficientnet_lite0@")
    sku = demo_products(3)[1].sku
    result = invoke("catalog", "remove", sku, "--catalog", cat)
    assert result.exit_code == 0, result.output
    assert f"removed product {sku} (2 images)" in result.stdout
    info = json.loads(invoke("catalog", "info", "--catalog", cat, "--json").stdout)
    assert (info["products"], info["images"]) == (2, 4)
    assert info["indexes"]["images"] == 4
    hits = json.loads(invoke("search", built["query"], "--catalog", cat, "--json").stdout)
    assert sku not in {h["sku"] for h in hits["image_results"]}
    assert_user_error(invoke("catalog", "remove", sku, "--catalog", cat), 1, "no product", sku)
    huge = "9" * 30
    assert_user_error(invoke("catalog", "remove", huge, "--catalog", cat), 1, "no product", huge)
    table = invoke("catalog", "info", "--catalog", cat)
    assert table.exit_code == 0 and "model_id" in table.stdout


def test_evaluate_tiny_manifest(tmp_path: Path, lite0_model_dir: Path) -> None:
    products = demo_products(3, seed=11)
    rows = []
    for n, product in enumerate(products):
        for j, role in enumerate(("gallery", "gallery", "query")):
            path = tmp_path / f"{product.sku}-{j}.jpg"
            render(product, seed=100 * n + j, size=64).save(path)
            rows.append([path.name, product.sku, role])
    manifest = tmp_path / "eval.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "product_id", "role"], *rows])
    out = tmp_path / "out" / "report.json"
    result = invoke(
        "evaluate",
        "--manifest",
        manifest,
        "--model",
        lite0_model_dir,
        "-k",
        1,
        "-k",
        3,
        "--json-out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)
    assert (report["queries"], report["gallery"], report["products"]) == (3, 6, 3)
    assert set(report["recall"]) == {"R@1", "R@3"}
    assert report["recall"]["R@3"] == 1.0  # 3 products: every query's product is in the top 3
    assert 0 <= report["recall"]["R@1"] <= 1
    assert json.loads(out.read_text()) == [report]
    table = invoke("evaluate", "--manifest", manifest, "--model", lite0_model_dir, "-k", 1)
    assert table.exit_code == 0 and "R@1" in table.stdout and "mAP@R" in table.stdout


def test_demo(tmp_path: Path, lite0_model_dir: Path) -> None:
    args = ("demo", "--dir", tmp_path / "demo", "--products", 8, "-k", 3)
    result = invoke(*args, "--model", lite0_model_dir)
    assert result.exit_code == 0, result.output
    assert "recall@1 over 8 held-out demo photos" in result.stdout
    assert (tmp_path / "demo" / "catalog" / "catalog.json").is_file()
    recall = float(result.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert recall >= 0.5  # distinct colours/patterns: an ImageNet model gets most of them
    again = invoke(*args)  # no --model: the catalog's own model
    assert again.exit_code == 0, again.output
    assert "indexed 0 new images, 32 already there" in again.stdout


# --- exit codes and messages ---------------------------------------------------------------


def test_missing_catalog(built: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert_user_error(invoke("search", built["query"], "--catalog", missing), 1, "no catalog here")
    assert_user_error(invoke("catalog", "info", "--catalog", missing), 1, str(missing))
    assert_user_error(invoke("catalog", "remove", "x", "--catalog", missing), 1, "no catalog")
    assert not missing.exists()


def test_bad_csv_exits_2(tmp_path: Path, lite0_model_dir: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("product_id,image_path,price\np1,a.jpg,cheap\n")
    line = assert_user_error(
        invoke("index", bad, "--catalog", tmp_path / "cat", "--model", lite0_model_dir), 2, "price"
    )
    assert f"{bad}:2:" in line
    assert not (tmp_path / "cat").exists()
    assert_user_error(invoke("index", tmp_path / "missing.csv", "--catalog", tmp_path / "c"), 2)


def test_bad_k_exits_2(built: dict[str, Any], cat: Path) -> None:
    for k in ("0", "1001", "ten"):
        result = invoke("search", built["query"], "--catalog", cat, "-k", k)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output


def test_unusable_output_paths_are_one_line_errors(built: dict[str, Any], cat: Path) -> None:
    a_file = built["query"]
    result = invoke(
        "search",
        built["query"],
        "--catalog",
        cat,
        "--detector",
        "none",
        "--save-boxes",
        a_file / "boxes.png",
    )
    assert_user_error(result, 1, str(a_file), "a folder is needed")
    result = invoke(
        "search", built["query"], "--catalog", cat, "--detector", "none", "--save-boxes", cat
    )
    assert_user_error(result, 1, str(cat), "Is a directory")
    result = invoke("demo", "--dir", a_file / "demo", "--products", 2)
    assert_user_error(result, 1, str(a_file))


def test_evaluate_bad_cutoff_exits_2(tmp_path: Path) -> None:
    manifest = tmp_path / "eval.csv"
    manifest.write_text("path,product_id,role\na.jpg,p1,query\nb.jpg,p1,gallery\n")
    result = invoke("evaluate", "--manifest", manifest, "-k", 0)
    assert_user_error(result, 2, "K must be >= 1")


def test_bad_price_filter_exits_2(built: dict[str, Any], cat: Path) -> None:
    result = invoke("search", built["query"], "--catalog", cat, "--min-price", 5, "--max-price", 1)
    assert_user_error(result, 2, "min_price")


def test_nonexistent_query_image(cat: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    assert_user_error(invoke("search", missing, "--catalog", cat), 1, str(missing), "not found")


def test_corrupt_query_image(cat: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("<!DOCTYPE html><html></html>")
    assert_user_error(invoke("search", broken, "--catalog", cat), 1, str(broken), "not an image")
    cut = tmp_path / "cut.png"
    render(demo_products(1)[0], seed=1, size=64).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    assert_user_error(invoke("search", cut, "--catalog", cat), 1, str(cut), "truncated")


def test_unknown_model_message_is_one_line(tmp_path: Path, built: dict[str, Any]) -> None:
    """Messages holding [...] (a list of backbones) are printed as text, not rich markup."""
    result = invoke("index", built["csv"], "--catalog", tmp_path / "c", "--model", "resnet9000")
    line = assert_user_error(result, 1, "resnet9000", "['efficientnet_lite0'")
    assert line.endswith("]")


def test_error_message_not_wrapped(tmp_path: Path, built: dict[str, Any]) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8) / "query.jpg"
    assert len(str(deep)) > 200
    assert_user_error(invoke("search", deep, "--catalog", built["catalog"]), 1, str(deep))


def test_console_script_error_without_traceback(tmp_path: Path) -> None:
    """The installed entry point, in a real process: exit 1 and one line, no traceback."""
    exe = Path(sys.executable).parent / "snapshop"
    if not exe.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run(
        [str(exe), "catalog", "info", "--catalog", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "40"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no catalog here" in proc.stderr
    assert "Traceback" not in proc.stderr
