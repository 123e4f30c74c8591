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


def test_quantize_onnx_from_a_ranges_file_repeats_the_calibration(tmp_path: Path) -> None:
    """The calibrated ranges, saved, give the same int8 model without the images (issue #16:
    the segmenter ships its trunk's ranges instead of its calibration photos)."""
    import onnxruntime as ort
    from test_flops import export_tiny

    from snapshop.models.quantize import quantize_onnx

    source = export_tiny(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    ranges = tmp_path / "ranges.json"
    quantize_onnx(source, tmp_path / "calibrated.onnx", batches, ranges=ranges)
    assert ranges.is_file()
    quantize_onnx(source, tmp_path / "from_ranges.onnx", None, ranges=ranges)
    x = rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
    outs = []
    for name in ("calibrated.onnx", "from_ranges.onnx", "tiny.onnx"):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {"x": x})[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])  # quantised: not the float model
    # 0.15: without AVX-512 VNNI, ONNX Runtime's u8 x s8 kernels (VPMADDUBSW) saturate; errors
    # reach 9 % of the largest output on an AVX2-only EPYC (2026-12-07), within 5 % before
    np.testing.assert_allclose(outs[0], outs[2], atol=0.15 * np.abs(outs[2]).max())
    ops = {n.op_type for n in onnx.load(str(tmp_path / "from_ranges.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # New batches recalibrate: the old ranges file is replaced, not read.
    quantize_onnx(source, tmp_path / "again.onnx", [10 * b for b in batches], ranges=ranges)
    wider = ort.InferenceSession(str(tmp_path / "again.onnx"), providers=["CPUExecutionProvider"])
    assert not np.array_equal(wider.run(None, {"x": x})[0], outs[0])
    with pytest.raises(ConfigError, match="ranges"):
        quantize_onnx(source, tmp_path / "none.onnx", None, ranges=tmp_path / "missing.json")
