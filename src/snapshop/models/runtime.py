"""ONNX Runtime sessions on the CPU, set up one way for every model snapshop runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SPINNING_ENV = "SNAPSHOP_ORT_SPINNING"  # "1": ONNX Runtime's default (workers spin when idle)


def cpu_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a model file or its bytes.

    ``threads``: intra-op threads (None or 0: ONNX Runtime's choice, one per core). Raises
    whatever ONNX Runtime raises for a bad model; callers say which model it was.
    """
    import onnxruntime as ort

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
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
