"""Evaluation report extensions: recall plot, result grid, and the prepare/train/evaluate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from snapshop.cli import app
from snapshop.evaluate.plots import HIT, MISS, plot_grid, plot_recall
from snapshop.evaluate.retrieval import RetrievalReport

runner = CliRunner()


def _colour_pixels(png: Path, hex_colour: str, tol: int = 40) -> int:
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(arr - rgb).sum(axis=2) < tol).sum())


def _report(tmp_path: Path, perfect: bool) -> RetrievalReport:
    paths = []
    for i, colour in enumerate([(200, 200, 200), (90, 90, 90), (150, 150, 150)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (30, 30), colour).save(paths[-1])
    q = np.eye(3, dtype=np.float32)
    g = np.eye(3, dtype=np.float32) if perfect else np.roll(np.eye(3, dtype=np.float32), 1, 0)
    products = ["a", "b", "c"]
    vectors = {
        "query_vecs": q,
        "query_paths": paths,
        "query_products": products,
        "gallery_vecs": g,
        "gallery_paths": paths,
        "gallery_products": products,
    }
    recall = {1: 1.0 if perfect else 0.0, 2: 1.0, 3: 1.0}
    return RetrievalReport(
        "perfect" if perfect else "shifted", recall, 1.0, 3, 3, 3, 1.0, 0.1, vectors=vectors
    )


def test_grid_marks_hits_green_and_misses_red(tmp_path: Path) -> None:
    good = plot_grid([_report(tmp_path, True)], tmp_path / "good.png", n_queries=3, top=1)
    bad = plot_grid([_report(tmp_path, False)], tmp_path / "bad.png", n_queries=3, top=1)
    assert _colour_pixels(good, HIT) > 100 and _colour_pixels(good, MISS) == 0
    assert _colour_pixels(bad, MISS) > 100 and _colour_pixels(bad, HIT) == 0


def test_recall_plot_draws_one_line_per_model(tmp_path: Path) -> None:
    png = plot_recall([_report(tmp_path, True), _report(tmp_path, False)], tmp_path / "r.png")
    image = Image.open(png)
    assert image.format == "PNG" and image.size[0] > 300


def _demo_manifest(root: Path, n_products: int = 5) -> Path:
    from snapshop.demo import demo_products, render

    lines = ["path,product_id,role,domain"]
    for n, product in enumerate(demo_products(n_products, seed=2)):
        for j in range(3):
            name = f"{product.sku}-{j}.jpg"
            render(product, 500 + 10 * n + j, size=160).save(root / name)
            role, domain = (
                ("query", "photo") if j == 0 else ("gallery", "iconic" if j == 1 else "photo")
            )
            lines.append(f"{name},{product.sku},{role},{domain}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


@pytest.mark.slow
def test_evaluate_cli_writes_plot_grid_and_table(tmp_path: Path, lite0_model_dir: Path) -> None:
    manifest = _demo_manifest(tmp_path)
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "-m",
            str(lite0_model_dir),
            "-k",
            "1",
            "-k",
            "5",
            "--gallery-where",
            "domain=iconic",
            "--plot",
            str(tmp_path / "recall.png"),
            "--grid",
            str(tmp_path / "grid.png"),
            "--json-out",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "R@1" in result.output and "search ms/query" in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data[0]["gallery"] == 5 and data[0]["queries"] == 5
    assert 0.0 <= data[0]["recall"]["R@1"] <= data[0]["recall"]["R@5"] == 1.0
    for png in ("recall.png", "grid.png"):
        assert Image.open(tmp_path / png).format == "PNG"
    assert _colour_pixels(tmp_path / "grid.png", HIT) > 0  # R@5 = 1: every row has a hit


def test_prepare_cli_and_user_errors(tmp_path: Path) -> None:
    for p in range(5):
        (tmp_path / "shop" / f"sku-{p}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (50 * p, 20 * i, 9)).save(
                tmp_path / "shop" / f"sku-{p}" / f"{i}.jpg"
            )
    result = runner.invoke(
        app,
        [
            "prepare",
            str(tmp_path / "shop"),
            "--out",
            str(tmp_path / "split.csv"),
            "--test-fraction",
            "0.4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "test/query" in result.output
    assert (tmp_path / "split.csv").read_text().count(",test") == 4
    bad = runner.invoke(app, ["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")])
    assert bad.exit_code == 2 and "error" in bad.output and "Traceback" not in bad.output
    held_out = []
    for fold in range(2):
        out = tmp_path / f"fold{fold}.csv"
        result = runner.invoke(
            app,
            [
                "prepare",
                str(tmp_path / "shop"),
                "--out",
                str(out),
                "--folds",
                "2",
                "--fold",
                str(fold),
            ],
        )
        assert result.exit_code == 0, result.output
        held_out.append(
            {line.split(",")[1] for line in out.read_text().splitlines() if line.endswith(",test")}
        )
    assert len(held_out[0] | held_out[1]) == 5 and not held_out[0] & held_out[1]
    bad = runner.invoke(
        app,
        [
            "prepare",
            str(tmp_path / "shop"),
            "--out",
            str(tmp_path / "x.csv"),
            "--folds",
            "2",
            "--fold",
            "2",
        ],
    )
    assert bad.exit_code == 2 and "fold must be in 0..1" in bad.output
    train_args = ["train", "--manifest", str(tmp_path / "split.csv"), "--out", str(tmp_path / "m")]
    bad = runner.invoke(app, [*train_args, "--train-where", "split=nothing"])
    assert bad.exit_code == 2 and "no manifest row" in bad.output
    bad = runner.invoke(app, [*train_args, "--pooling", "max"])
    assert bad.exit_code == 2 and "pooling must be one of" in bad.output
    assert not (tmp_path / "m").exists()  # refused before anything was written
