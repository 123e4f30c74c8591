"""ONNX Runtime sessions on the CPU, set up one way for every model snapshop runs.

Two precisions (issue #16):

- ``bf16`` (the default): ONNX Runtime's OpenVINO execution provider with bfloat16 inference.
  On CPUs with AMX or AVX512-BF16 the convolutions run in bf16 (Lite2, one image, one thread:
  26.8 -> 8.7 ms; docs/benchmarks/service.md, "Speed per core"); on other CPUs OpenVINO
  keeps f32 and is still faster than the default provider. The vectors differ from fp32's in
  the third decimal, so catalogs built either way are searched with the other.
- ``fp32``: ONNX Runtime's own CPU provider, exactly as before; also what ``bf16`` falls back
  to where the OpenVINO provider is not installed (``onnxruntime-openvino`` ships it, on
  x86-64 Linux). Statically quantised (int8 QDQ) models always run here: the provider's
  int8 kernels are its strength, OpenVINO ran them no faster.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapshop.errors import ConfigError

log = logging.getLogger(__name__)

SPINNING_ENV = "SNAPSHOP_ORT_SPINNING"  # "1": ONNX Runtime's default (workers spin when idle)
PRECISION_ENV = "SNAPSHOP_PRECISION"
PRECISIONS = ("bf16", "fp32")
DEFAULT_PRECISION = "bf16"
OPENVINO = "OpenVINOExecutionProvider"
# Frozen features cached for training stay in fp32: the recipes' measured results were made so.
TRAINING_PRECISION = "fp32"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def default_precision() -> str:
    """``$SNAPSHOP_PRECISION`` when set, else ``bf16``."""
    value = os.environ.get(PRECISION_ENV, "").strip()
    if not value:
        return DEFAULT_PRECISION
    if value not in PRECISIONS:
        raise ConfigError(f"{PRECISION_ENV} must be one of {', '.join(PRECISIONS)}, not {value!r}")
    return value


@functools.cache
def openvino_available() -> bool:
    import onnxruntime as ort

    return OPENVINO in ort.get_available_providers()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cpu_session(
    model: str | Path | bytes, threads: int | None = None, precision: str | None = None
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a model file or its bytes.

    ``threads``: intra-op threads (None or 0: one per core). ``precision``: ``bf16`` or
    ``fp32`` (None: :func:`default_precision`). Raises whatever ONNX Runtime raises for a bad
    model; callers say which model it was.
    """
    import onnxruntime as ort

    precision = check_precision(precision or default_precision())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    # By default a session's workers keep spinning after each run. A query runs three
    # sessions back to back (detector trunk, its head, the embedder), so idle pools spin
    # against the busy one, and any other process on a 2-core machine makes it worse.
    # Without spinning, whole-query p50 122-144 -> 109-111 ms idle, 288-305 -> 147-163 ms
    # beside one busy process (docs/benchmarks.md, "ONNX Runtime thread spinning"). Spinning
    # only inside a run (session.force_spinning_stop) is as bad beside a busy process. One
    # session run back to back at batch 1 is faster with spinning; a query is not that.
    if os.environ.get(SPINNING_ENV, "0") != "1":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    providers: list[Any] = ["CPUExecutionProvider"]
    if precision == "bf16" and openvino_available():
        cpu: dict[str, str] = {
            "INFERENCE_PRECISION_HINT": "bf16",
            "PERFORMANCE_HINT": "LATENCY",
            # OpenVINO pins a session's threads to cores, and every session of a process to
            # the same one: indexing with two threads left 40 % of the machine idle pinned,
            # 10 % unpinned (docs/benchmarks/scale.md, "Indexing with the segmenter").
            "ENABLE_CPU_PINNING": "NO",
        }
        if threads:
            cpu["INFERENCE_NUM_THREADS"] = str(threads)
        openvino = {"device_type": "CPU", "load_config": json.dumps({"CPU": cpu})}
        providers = [(OPENVINO, openvino), "CPUExecutionProvider"]
    return ort.InferenceSession(source, options, providers=providers)


def session_precision(session: Any) -> str:
    """What a session from :func:`cpu_session` runs in: ``bf16`` on the OpenVINO provider,
    else ``fp32`` (ONNX Runtime's CPU provider)."""
    return "bf16" if session.get_providers()[0] == OPENVINO else "fp32"


class SessionPool:
    """The sessions of one model, lent one call at a time where the provider needs it.

    ONNX Runtime's OpenVINO provider runs one call of a session at a time (lending each
    ingest mapper its own took indexing from 34.1 to 40.5 photos/s), so under bf16 every
    call running at once (an embedding pool's thread, an ingest mapper, a request) borrows
    a session of its own, made on demand up to ``size``; beyond, callers wait: more calls
    at once than cores would only share them. ONNX Runtime's CPU provider runs calls of
    one session side by side: there, one session serves every call. ``make``: a function
    returning a new session of the model.
    """

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self._make = make
        self.first = make()  # raises what ONNX Runtime raises for a bad model
        self.precision = session_precision(self.first)
        self.size = max(size, 1) if self.precision == "bf16" else 1
        self._idle = [self.first]
        self._made = 1
        self._free = threading.Condition()

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        """``session.run(None, feeds)`` on a session no other call is running."""
        if self.precision != "bf16":
            out: list[Any] = self.first.run(None, feeds)
            return out
        session = self._borrow()
        try:
            out = session.run(None, feeds)
        finally:
            with self._free:
                self._idle.append(session)
                self._free.notify()
        return out

    def open_all(self) -> None:
        """Make now every session the pool may lend, instead of on first use: a service
        calls this at start so that no request waits for one to compile (the first two
        requests at once measured p99 ≈ 300 ms against p95 70 without it)."""
        with self._free:
            missing = self.size - self._made
            self._made = self.size
        made = [self._make() for _ in range(missing)]
        with self._free:
            self._idle.extend(made)
            self._free.notify_all()

    def _borrow(self) -> Any:
        with self._free:
            while not self._idle and self._made >= self.size:
                self._free.wait()
            if self._idle:
                return self._idle.pop()
            self._made += 1
        try:
            return self._make()
        except BaseException:
            with self._free:
                self._made -= 1
                self._free.notify()
            raise
