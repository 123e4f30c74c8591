"""benchmarks/precision_accuracy.py on a tiny generated manifest (issue #16): its fp32/fp32 row
is the library's own evaluation, the tables have every combination, the cache is used."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from script_helpers import load_script

from snapshop.evaluate.retrieval import evaluate_manifest
from snapshop.models.runtime import openvino_available

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 200)}


def write_manifest(folder: Path) -> Path:
    """Three products: two query photos, two gallery photos and one catalog image each."""
    rows = []
    for product, colour in COLOURS.items():
        for i, (role, domain) in enumerate(
            [("query", "natural")] * 2 + [("gallery", "natural")] * 2 + [("gallery", "iconic")]
        ):
            background = (255, 255, 255) if domain == "iconic" else (90 + 30 * i, 110, 80 + 20 * i)
            image = Image.new("RGB", (160, 120), background)
            inset = 10 + 6 * i
            ImageDraw.Draw(image).ellipse((inset, inset, 160 - inset, 120 - inset), fill=colour)
            name = f"{product}-{i}.jpg"
            image.save(folder / name)
            rows.append({"path": name, "product_id": product, "role": role, "domain": domain})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def run_main(script, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(sys, "argv", ["precision_accuracy.py", *argv])
    return script.main()


def test_fp32_row_is_the_library_evaluation_and_every_combination_is_printed(
    tmp_path: Path, lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    script = load_script("benchmarks/precision_accuracy.py")
    manifest = write_manifest(tmp_path)
    cache = tmp_path / "cache"
    argv = [str(manifest), "--model", str(lite0_model_dir), "--cache", str(cache)]
    result = run_main(script, argv, monkeypatch)
    out = capsys.readouterr().out

    cells = {(c.protocol, c.queries, c.gallery): c for c in result["cells"]}
    protocols = ("photo → all gallery", "photo → catalog")
    combos = [(q, g) for q in ("fp32", "bf16") for g in ("fp32", "bf16")]
    assert set(cells) == {(p, q, g) for p in protocols for q, g in combos}
    for protocol in protocols:
        for q, g in combos:
            assert f"| {protocol} | {q} | {g} | " in out
        # the reference row differs from itself by nothing, with no interval around it
        reference = next(
            line for line in out.splitlines() if line.startswith(f"| {protocol} | fp32 | fp32 |")
        )
        assert "| +0.0000 [+0.0000, +0.0000] | 0 of 6 |" in reference
    assert cells[(protocols[0], "fp32", "fp32")].report.n_gallery == 9
    assert cells[(protocols[1], "fp32", "fp32")].report.n_gallery == 3

    # fp32/fp32 is what `snapshop evaluate` reports with SNAPSHOP_PRECISION=fp32
    monkeypatch.setenv("SNAPSHOP_PRECISION", "fp32")
    for protocol, where in zip(protocols, (None, {"domain": "iconic"}), strict=True):
        library = evaluate_manifest(manifest, str(lite0_model_dir), (1, 5, 10), None, where)
        ours = cells[(protocol, "fp32", "fp32")].report
        assert ours.recall == library.recall
        assert ours.image_recall == library.image_recall
        assert ours.map_at_r == pytest.approx(library.map_at_r, abs=1e-6)
        assert ours.n_queries == library.n_queries == 6

    assert result["embedded"]["fp32"].precision == "fp32"
    if openvino_available():
        assert result["embedded"]["bf16"].precision == "bf16"
    groups = {row[0]: row for row in result["cosines"]}
    assert [groups[g][1] for g in ("all", "query photos", "gallery photos", "catalog images")] == [
        15,
        6,
        6,
        3,
    ]
    for _, _, low, p1, median in result["cosines"]:
        assert 0.9 < low <= p1 <= median <= 1 + 1e-5
    assert "| catalog images | 3 |" in out

    # a rerun reads the cached vectors and embeds nothing
    def no_embedding(*args: object, **kwargs: object) -> None:
        raise AssertionError("embedded again despite the cache")

    monkeypatch.setattr(script, "Embedder", no_embedding)
    again = run_main(script, argv, monkeypatch)
    for cell, cached in zip(result["cells"], again["cells"], strict=True):
        assert cell.report.recall == cached.report.recall
    assert capsys.readouterr().out == out
