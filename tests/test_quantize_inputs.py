"""`snapshop quantize` refuses what it cannot quantise, with typed errors, and never writes a
model that does not load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from catalog_helpers import make_images, shop_csv

from snapshop.errors import ManifestError, ModelError
from snapshop.models.card import MODEL_FILE, ModelCard, sha256_file, write_card
from snapshop.models.quantize import calibration_paths, quantize_model, quantize_onnx


def _batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32) for _ in range(2)]


def test_an_int8_model_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from test_flops import export_tiny

    model = tmp_path / "int8"
    model.mkdir()
    export_tiny(model / MODEL_FILE)
    card = ModelCard(
        name="tiny-int8", backbone="efficientnet_lite0", input_size=224, output_dim=10,
        source_weights_sha256="0" * 64, onnx_sha256=sha256_file(model / MODEL_FILE),
        kind="imagenet+int8-static-qdq",
    )  # fmt: skip
    write_card(model, card)
    images = make_images(tmp_path / "shop", n_products=2, per_product=1, size=32)
    out = tmp_path / "again"
    with pytest.raises(ModelError, match="already an int8 model"):
        quantize_model(model, shop_csv(tmp_path / "c.csv", images), out)
    assert not out.exists()


def test_a_quantised_graph_that_does_not_load_replaces_nothing(tmp_path: Path) -> None:
    from test_flops import export_tiny

    source = export_tiny(tmp_path / "tiny.onnx")
    int8 = tmp_path / "int8.onnx"
    quantize_onnx(source, int8, _batches())
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(b"the previous model")
    # quantising a QDQ graph again repeats node names: ONNX Runtime refuses to load it
    with pytest.raises(ModelError, match="does not run"):
        quantize_onnx(int8, target, _batches())
    assert target.read_bytes() == b"the previous model"
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]


def test_calibration_csv_errors_name_the_file_and_line(tmp_path: Path) -> None:
    short = tmp_path / "short.csv"
    short.write_text("product_id,image_path\np1\n")
    with pytest.raises(ManifestError, match=r"short\.csv:2: empty path"):
        calibration_paths(short)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"product_id,image_path\np1,\xff\xfe.jpg\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        calibration_paths(binary)
    # a catalog CSV (image_path, no role) still lists every image
    images = make_images(tmp_path / "shop", n_products=2, per_product=2, size=32)
    found = calibration_paths(shop_csv(tmp_path / "c.csv", images))
    assert sorted(found) == sorted(p for paths in images.values() for p in paths)
