"""Static int8 quantisation (issue #6): a calibrated QDQ model dir that embeds like fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from catalog_helpers import make_images, shop_csv

from snapshop.errors import ConfigError
from snapshop.images import load_image
from snapshop.models.card import read_card
from snapshop.models.embedder import Embedder
from snapshop.models.quantize import QuantizeConfig, calibration_paths, quantize_model


@pytest.mark.slow
def test_quantize_lite0(tmp_path: Path, lite0_model_dir: Path, lite0_embedder: Embedder) -> None:
    images = make_images(tmp_path / "shop", n_products=6, per_product=3, size=96)
    csv = shop_csv(tmp_path / "catalog.csv", images)
    card = quantize_model(lite0_model_dir, csv, tmp_path / "int8", QuantizeConfig(max_images=12))
    fp32 = read_card(lite0_model_dir)
    assert card.model_id != fp32.model_id and card.name == f"{fp32.name}-int8"
    assert card.training["quantization"]["calibration_images"] == 12
    assert card.training["quantization"]["float_ends"] is True
    assert read_card(tmp_path / "int8") == card
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = Embedder(tmp_path / "int8", verify=True)
    assert int8.dim == lite0_embedder.dim
    pics = [load_image(p) for paths in images.values() for p in paths]
    a, b = lite0_embedder.embed_images(pics), int8.embed_images(pics)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    # A broken quantisation (wrong scales, float ends dropped) gives cosines far below these;
    # 12 drawn calibration images give ~0.89 mean here (grocery-dev photos: ~0.95).
    cos = np.sum(a * b, axis=1)
    assert cos.mean() > 0.85 and cos.min() > 0.7, cos
    # Nearest neighbours mostly agree between fp32 and int8.
    nn_a = np.argsort(-(a @ a.T), axis=1)[:, 1]
    nn_b = np.argsort(-(b @ b.T), axis=1)[:, 1]
    assert np.mean(nn_a == nn_b) >= 0.7


def test_calibration_sources(tmp_path: Path) -> None:
    images = make_images(tmp_path / "shop", n_products=2, per_product=2, size=32)
    assert len(calibration_paths(tmp_path / "shop")) == 4
    assert len(calibration_paths(shop_csv(tmp_path / "c.csv", images))) == 4
    manifest = tmp_path / "m.csv"
    rows = ["path,product_id,role"] + [
        f"{p.relative_to(tmp_path)},{sku},{'gallery' if i else 'query'}"
        for sku, paths in images.items()
        for i, p in enumerate(paths)
    ]
    manifest.write_text("\n".join(rows) + "\n")
    found = calibration_paths(manifest)
    assert len(found) == 2 and all(p.exists() and p.name == "1.jpg" for p in found)
    with pytest.raises(ConfigError):
        calibration_paths(tmp_path / "nope.txt")
    with pytest.raises(ConfigError):
        QuantizeConfig(method="dynamic")
