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
def test_bf16_calls_at_once_each_borrow_a_session(lite0_model_dir: Path) -> None:
    """The OpenVINO provider runs one call of a session at a time: under bf16 each call running
    at once (pool threads, an ingest mapper, a request thread) borrows a session of its own,
    made on demand up to ``parallel``; further callers wait. The vectors are one session's."""
    import threading

    images = [render(p, seed=i, size=200) for i, p in enumerate(demo_products(6))]
    serial = Embedder(lite0_model_dir, parallel=1).embed_images(images)
    pooled = Embedder(lite0_model_dir, parallel=2)
    running, peak, made = [0], [0], [0]
    lock = threading.Lock()

    def counting_session() -> object:
        made[0] += 1
        session = runtime.cpu_session(lite0_model_dir / "model.onnx", 1, "bf16")
        run = session.run

        def counted(*args: object) -> object:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                return run(*args)
            finally:
                with lock:
                    running[0] -= 1

        session.run = counted
        return session

    pooled._new_session = counting_session  # type: ignore[method-assign]
    pooled._idle_sessions = []  # every session counted from here
    pooled._sessions_made = 0
    callers = [threading.Thread(target=pooled.embed_images, args=(images,)) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert made[0] == 2 and peak[0] == 2  # as many sessions as calls at once, no more
    np.testing.assert_allclose(pooled.embed_images(images), serial, atol=1e-6)
    exact = Embedder(lite0_model_dir, parallel=2, precision="fp32")
    exact._new_session = counting_session  # type: ignore[method-assign]
    exact.embed_images(images)
    assert made[0] == 2  # ONNX Runtime's CPU provider runs calls of one session at once


@needs_openvino
def test_open_sessions_makes_every_session_up_front(lite0_model_dir: Path) -> None:
    embedder = Embedder(lite0_model_dir, parallel=3)
    made: list[int] = []
    make = embedder._new_session
    embedder._new_session = lambda: made.append(1) or make()  # type: ignore[method-assign]
    embedder.open_sessions()
    assert len(made) == 2 and len(embedder._idle_sessions) == 3
    embedder.open_sessions()  # idempotent
    images = [render(p, seed=i, size=200) for i, p in enumerate(demo_products(6))]
    embedder.embed_images(images)
    assert len(made) == 2  # calls at once borrow the sessions made up front
    exact = Embedder(lite0_model_dir, parallel=3, precision="fp32")
    exact.open_sessions()
    assert exact._idle_sessions == [exact.session]  # one session serves fp32 calls at once
