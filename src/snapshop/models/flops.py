"""Compute floors: the FLOPs of an ONNX graph and the machine's measured matrix-product speed.

A stage's *compute floor* is the FLOPs its graph needs divided by what this machine does in a
dense single-precision matrix product (numpy sgemm): the time it could take if every operation
ran as well as the best-case kernel. Depthwise convolutions never get there (they read as many
bytes as they compute), so the ratio of measured time to the floor says how far a stage is from
the hardware, not that it can reach it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snapshop.errors import ModelError

log = logging.getLogger(__name__)

COUNTED_OPS = ("Conv", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger", "Gemm")


@dataclass(frozen=True)
class GraphFlops:
    """Multiply-add FLOPs (2 per multiply-accumulate) of a graph at one input shape."""

    total: float
    by_op: dict[str, float]
    depthwise: float  # the part spent in depthwise (groups == channels) convolutions

    @property
    def gflop(self) -> float:
        return self.total / 1e9


def _shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape after shape inference (initialisers included); unknown dims -1.

    ONNX Runtime's symbolic inference, not onnx's: the exported SAME padding computes its pads
    through a chain of constant operators that only the former folds."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # the inference raises bare Exceptions for graphs it cannot follow
        raise ModelError(f"shape inference failed ({exc})") from None
    out: dict[str, tuple[int, ...]] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        out[info.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    for init in graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _fix_inputs(model: Any, input_shapes: Mapping[str, Sequence[int]]) -> None:
    names = {i.name for i in model.graph.input}
    unknown = set(input_shapes) - names
    if unknown:
        raise ModelError(f"no graph input named {sorted(unknown)}; inputs are {sorted(names)}")
    for graph_input in model.graph.input:
        if graph_input.name not in input_shapes:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        shape = input_shapes[graph_input.name]
        if len(dims) != len(shape):
            raise ModelError(f"{graph_input.name}: rank {len(dims)}, given shape {shape}")
        for dim, value in zip(dims, shape, strict=True):
            dim.Clear()
            dim.dim_value = int(value)


def graph_flops(model: str | Path | bytes, input_shapes: Mapping[str, Sequence[int]]) -> GraphFlops:
    """FLOPs of the convolutions and matrix products of ``model`` fed ``input_shapes``
    ({input name: concrete shape}); other operators (activations, pooling, resizing) are
    not counted: they are memory-bound and small next to these. Quantised graphs (QDQ) count
    the same as their float originals."""
    import onnx

    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    except Exception as exc:  # onnx raises DecodeError, OSError...
        raise ModelError(f"cannot read ONNX model for FLOP counting ({exc})") from None
    _fix_inputs(proto, input_shapes)
    shapes = _shapes(proto)
    by_op: dict[str, float] = {}
    depthwise = 0.0
    for node in proto.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        counted = _node_flops(node, shapes)
        if counted is None:
            log.warning("FLOPs: %s %s has unknown shapes; not counted", node.op_type, node.name)
            continue
        flops, is_depthwise = counted
        by_op[node.op_type] = by_op.get(node.op_type, 0.0) + flops
        if is_depthwise:
            depthwise += flops
    return GraphFlops(sum(by_op.values()), by_op, depthwise)


def _node_flops(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[float, bool] | None:
    out = shapes.get(node.output[0])
    if out is None or any(d < 0 for d in out):
        return None
    if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
        weight_name = node.input[3 if node.op_type == "QLinearConv" else 1]
        weight = shapes.get(weight_name)
        if weight is None or any(d < 0 for d in weight):
            return None
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        # weight (C_out, C_in / groups, kh, kw); one MAC per weight element per output pixel
        macs = float(np.prod(out)) * float(np.prod(weight[1:]))
        return 2.0 * macs, groups > 1 and weight[1] == 1
    # MatMul / Gemm: out (..., M, N), the shared dimension K from the first input's last axis
    a = shapes.get(node.input[0])
    if a is None or not a or a[-1] < 0:
        return None
    transposed = any(x.name == "transA" and x.i for x in node.attribute)
    k = a[-2] if transposed and len(a) >= 2 else a[-1]
    return 2.0 * float(np.prod(out)) * float(k), False


def sgemm_gflops(n: int = 1024, repeats: int = 7) -> float:
    """This machine's single-precision matrix-product speed (GFLOP/s): the fastest of
    ``repeats`` timed ``n``³ numpy products after a warm-up, with numpy's own threads. The
    fastest, not the median: the floor is what the hardware can do, and on a shared machine
    other processes only ever slow a run down."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / min(times) / 1e9
