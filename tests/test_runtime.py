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


class CountingSessions:
    """``make`` for a :class:`runtime.SessionPool`: real sessions of a model that count how
    many were made and how many of their calls ran at once."""

    def __init__(self, model: Path, precision: str) -> None:
        import threading

        self.model, self.precision = model, precision
        self.made = self.running = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self) -> object:
        self.made += 1
        session = runtime.cpu_session(self.model, 1, self.precision)
        run = session.run

        def counted(*args: object) -> object:
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                return run(*args)
            finally:
                with self.lock:
                    self.running -= 1

        session.run = counted
        return session


@needs_openvino
def test_bf16_calls_at_once_each_borrow_a_session(lite0_model_dir: Path) -> None:
    """The OpenVINO provider runs one call of a session at a time: under bf16 each call running
    at once borrows a session of its own, made on demand up to ``size``; further callers wait.
    ONNX Runtime's CPU provider runs one session's calls side by side: one session serves."""
    import threading

    feeds = {"images": np.zeros((1, 3, 224, 224), np.float32)}
    for precision, sessions in (("bf16", 2), ("fp32", 1)):
        make = CountingSessions(lite0_model_dir / "model.onnx", precision)
        pool = runtime.SessionPool(make, size=2)

        def call(pool: runtime.SessionPool = pool) -> None:
            for _ in range(6):
                pool.run(feeds)

        callers = [threading.Thread(target=call) for _ in range(4)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        assert make.made == sessions  # as many as calls at once under bf16, no more
        # bf16: two calls at once, one per session; fp32: the four callers on one session
        assert make.peak == 2 if precision == "bf16" else make.peak > 1
        pool.open_all()
        assert make.made == sessions  # nothing more to make


@needs_openvino
def test_open_all_makes_every_session_up_front(lite0_model_dir: Path) -> None:
    make = CountingSessions(lite0_model_dir / "model.onnx", "bf16")
    pool = runtime.SessionPool(make, size=3)
    pool.open_all()
    assert make.made == 3
    pool.run({"images": np.zeros((1, 3, 224, 224), np.float32)})
    assert make.made == 3


@needs_openvino
def test_the_embedder_and_the_segmenter_lend_sessions(lite0_model_dir: Path) -> None:
    """The embedder's pool holds up to one session per parallel call; pooled vectors are those
    of one session; the service opens them at start (``open_sessions``)."""
    from snapshop.detect.segmenter import SegmenterDetector

    images = [render(p, seed=i, size=200) for i, p in enumerate(demo_products(6))]
    serial = Embedder(lite0_model_dir, parallel=1).embed_images(images)
    pooled = Embedder(lite0_model_dir, parallel=2)
    assert pooled.sessions.size == 2 and pooled.session is pooled.sessions.first
    np.testing.assert_allclose(pooled.embed_images(images), serial, atol=1e-6)
    assert Embedder(lite0_model_dir, parallel=2, precision="fp32").sessions.size == 1
    trunk = SegmenterDetector().trunk
    assert trunk.sessions.size == runtime.usable_cores()
    assert SegmenterDetector(precision="fp32").trunk.sessions.size == 1
