"""Inference precision (issue #16): bf16 on ONNX Runtime's OpenVINO provider by default, fp32 on
its CPU provider on request, one way to ask for it, and the fallbacks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from snapshop.demo import demo_products, render
from snapshop.errors import ConfigError
from snapshop.models import runtime
from snapshop.models.card import read_card, write_card
from snapshop.models.embedder import Embedder

needs_openvino = pytest.mark.skipif(
    not runtime.openvino_available(), reason="onnxruntime-openvino is not installed here"
)


@needs_openvino
def test_default_is_bf16_on_openvino_and_close_to_fp32(lite0_model_dir: Path) -> None:
    fast = Embedder(lite0_model_dir)
    exact = Embedder(lite0_model_dir, precision="fp32")
    assert fast.precision == "bf16" and exact.precision == "fp32"
    assert fast.session.get_providers()[0] == runtime.OPENVINO
    assert exact.session.get_providers() == ["CPUExecutionProvider"]
    images = [render(p, seed=i, size=200) for i, p in enumerate(demo_products(6))]
    a, b = fast.embed_images(images), exact.embed_images(images)
    cosine = np.sum(a * b, axis=1)
    assert cosine.min() > 0.99
    # the same image is still nearest to itself across precisions
    assert (np.argmax(a @ b.T, axis=1) == np.arange(len(images))).all()


def test_environment_chooses_the_precision(
    lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(runtime.PRECISION_ENV, "fp32")
    assert Embedder(lite0_model_dir).precision == "fp32"
    monkeypatch.setenv(runtime.PRECISION_ENV, "fp16")
    with pytest.raises(ConfigError, match="SNAPSHOP_PRECISION"):
        Embedder(lite0_model_dir)
    monkeypatch.delenv(runtime.PRECISION_ENV)
    with pytest.raises(ConfigError, match="precision must be one of"):
        Embedder(lite0_model_dir, precision="double")


def test_bf16_falls_back_to_the_cpu_provider_without_openvino(
    lite0_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    embedder = Embedder(lite0_model_dir, precision="bf16")
    assert embedder.precision == "fp32"
    assert embedder.session.get_providers() == ["CPUExecutionProvider"]


@needs_openvino
def test_a_quantised_model_runs_on_the_cpu_provider(lite0_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "int8"
    copy.mkdir()
    (copy / "model.onnx").write_bytes((lite0_model_dir / "model.onnx").read_bytes())
    card = read_card(lite0_model_dir)
    write_card(copy, dataclasses.replace(card, kind=f"{card.kind}+int8-static-qdq"))
    assert Embedder(copy).precision == "fp32"
    assert Embedder(lite0_model_dir).precision == "bf16"


@needs_openvino
def test_segmenter_precision_reaches_its_sessions() -> None:
    from snapshop.detect.segmenter import SegmenterDetector

    fast = SegmenterDetector()
    exact = SegmenterDetector.from_spec("precision=fp32")
    assert fast.precision == "bf16" and exact.precision == "fp32"
    assert fast.head.get_providers()[0] == runtime.OPENVINO
    assert fast.trunk.session.get_providers()[0] == runtime.OPENVINO
    assert exact.head.get_providers() == ["CPUExecutionProvider"]
    assert exact.trunk.session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="precision"):
        SegmenterDetector.from_spec("precision=fp16")


@needs_openvino
def test_bf16_pool_threads_each_run_their_own_session(lite0_model_dir: Path) -> None:
    """The OpenVINO provider runs one call of a session at a time: under bf16 every embedding
    thread gets a session of its own, so side-by-side calls use both cores; the vectors are
    those of one session."""
    images = [render(p, seed=i, size=200) for i, p in enumerate(demo_products(6))]
    pooled = Embedder(lite0_model_dir, parallel=2)
    created: list[object] = []
    make = pooled._new_session
    pooled._new_session = lambda: created.append(1) or make()  # type: ignore[method-assign]
    side_by_side = pooled.embed_images(images)
    assert len(created) == 2  # one per pool thread; the caller's session is the first one
    serial = Embedder(lite0_model_dir, parallel=1).embed_images(images)
    np.testing.assert_allclose(side_by_side, serial, atol=1e-6)
    exact = Embedder(lite0_model_dir, parallel=2, precision="fp32")
    exact._new_session = lambda: created.append(1) or make()  # type: ignore[method-assign]
    exact.embed_images(images)
    assert len(created) == 2  # ONNX Runtime's CPU provider runs calls of one session at once
