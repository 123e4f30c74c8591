"""Static int8 quantisation (QDQ, calibrated on catalog images) of an exported model directory.

Static QDQ int8 runs ~2-3x faster than fp32 on these CPUs; *dynamic* int8 is several times
slower (shared/NOTES.md), so it is not offered. Only convolutions and matrix products are
quantised; pooling and the L2 normalisation stay in float. The result is a new model
directory (model.onnx + model.json) with its own model id: a catalog built with the fp32
model must be re-indexed to use it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.errors import ConfigError, ImageDecodeError, ModelError
from snapshop.images import IMAGE_SUFFIXES, load_image
from snapshop.models.card import (
    MODEL_FILE,
    NORMALISATION,
    ModelCard,
    check_out_dir,
    read_card,
    sha256_file,
    write_card,
)
from snapshop.models.embedder import preprocess

log = logging.getLogger(__name__)

QUANTISED_OPS = ("Conv", "MatMul", "Gemm")
RANGES_FORMAT = "snapshop-activation-ranges-1"


@dataclass(frozen=True)
class QuantizeConfig:
    """``max_images`` calibration images (sampled with ``seed``) fed ``batch_size`` at a time;
    ``per_channel`` weight scales; ``method``: minmax | entropy | percentile."""

    max_images: int = 256
    batch_size: int = 16
    per_channel: bool = True
    method: str = "minmax"
    seed: int = 0
    activations: str = "uint8"
    keep_ends_float: bool = True  # leave the first and the last convolution in float

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "entropy", "percentile"):
            raise ConfigError(f"unknown calibration method {self.method!r}")
        if self.activations not in ("uint8", "int8"):
            raise ConfigError(f"activations must be uint8 or int8, not {self.activations!r}")
        if self.max_images < 1 or self.batch_size < 1:
            raise ConfigError("max_images and batch_size must be >= 1")


def calibration_paths(source: Path) -> list[Path]:
    """Images for calibration: a folder (searched recursively), a catalog CSV
    (``image_path``) or an evaluation manifest (``path``; only ``role=gallery`` rows, the
    catalog side, when there are any)."""
    from snapshop.data.manifest import read_manifest

    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if source.suffix.lower() != ".csv" or not source.is_file():
        raise ConfigError(f"{source}: expected a folder of images or a CSV manifest")
    rows = read_manifest(source, default_role="gallery")
    return [r.path for r in [r for r in rows if r.role == "gallery"] or rows]


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed image batches."""

    def __init__(self, input_name: str, batches: list[NDArray[np.float32]]) -> None:
        self.input_name = input_name
        self._it: Iterator[NDArray[np.float32]] = iter(batches)

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        pass


def _load_batches(
    paths: Sequence[Path],
    size: int,
    config: QuantizeConfig,
    normalisation: Mapping[str, float] = NORMALISATION,
) -> list[NDArray[np.float32]]:
    arrays = []
    for path in paths:
        try:
            arrays.append(preprocess(load_image(path), size, normalisation))
        except ImageDecodeError as exc:
            log.warning("calibration: skipped %s (%s)", path, exc.reason)
    if not arrays:
        raise ConfigError("no readable calibration images")
    stack = np.stack(arrays)
    return [stack[i : i + config.batch_size] for i in range(0, len(stack), config.batch_size)]


def quantize_onnx(
    source: Path,
    target: Path,
    batches: Sequence[NDArray[np.float32]] | None,
    config: QuantizeConfig = QuantizeConfig(),
    ranges: Path | None = None,
) -> None:
    """Static int8 (QDQ) copy of the ONNX file ``source`` at ``target``, calibrated on
    ``batches`` of the graph's first input (shapes may differ between batches when the graph
    has dynamic axes). Written through a temporary file next to ``target``.

    ``ranges``: a JSON file of the calibrated activation ranges. With ``batches`` it is
    written; without, it is read instead of calibrating (the same graph gives the same int8
    model from it, so a model can ship its ranges rather than its calibration images)."""
    if batches is None and (ranges is None or not Path(ranges).is_file()):
        raise ConfigError("quantize_onnx needs calibration batches or a ranges file")
    if batches is not None and ranges is not None:
        Path(ranges).unlink(missing_ok=True)  # a stale file would be read, not rewritten
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        input_name = graph.input[0].name
        if batches is not None:
            found = _calibrate(prepared, Path(tmp), input_name, batches, config.method)
            if ranges is not None:
                Path(ranges).write_text(json.dumps(_ranges_json(found)))
        else:
            found = _read_ranges(Path(ranges))  # type: ignore[arg-type]
        exclude = _end_convs(graph) if config.keep_ends_float else []
        written = Path(tmp) / target.name
        # The ranges enter as per-tensor overrides, so one probe batch stands in for the
        # calibration quantize_static insists on running (its own ranges are all replaced).
        overrides = {name: [{"rmin": lo, "rmax": hi}] for name, (lo, hi) in found.items()}
        probe = _Reader(input_name, [_probe_batch(graph.input[0])])
        quantize_static(
            str(prepared), str(written), probe,
            quant_format=QuantFormat.QDQ, nodes_to_exclude=exclude,
            activation_type=QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, per_channel=config.per_channel,
            op_types_to_quantize=list(QUANTISED_OPS), calibrate_method=CalibrationMethod.MinMax,
            extra_options={"TensorQuantOverrides": overrides},
        )  # fmt: skip
        _check_runs(written, graph.input[0])
        os.chmod(written, 0o644)
        written.replace(target)


def _end_convs(graph: Any) -> list[str]:
    """The convolutions nearest the graph's input and nearest its outputs: the first and the
    last of a model, of each member in a merged one (whose nodes follow one another, so the
    first and the last in node order would be one member's stem and another's head)."""
    consumers: dict[str, list[Any]] = {}
    producers: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    found: dict[str, None] = {}  # ordered, without repeats
    seen: set[int] = set()
    todo = [node for value in graph.input for node in consumers.get(value.name, [])]
    while todo:  # forward from the input to the first convolution of every path
        node = todo.pop()
        if id(node) in seen or node.op_type == "Shape":  # a shape carries no activations
            continue
        seen.add(id(node))
        if node.op_type == "Conv":
            found[node.name] = None
            continue
        todo.extend(c for name in node.output for c in consumers.get(name, []))
    seen.clear()
    todo = [producers[value.name] for value in graph.output if value.name in producers]
    while todo:  # back from the outputs to the last convolution of every path
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Conv":
            found[node.name] = None
            continue
        todo.extend(producers[name] for name in node.input if name in producers)
    return list(found)


def _check_runs(path: Path, graph_input: Any) -> None:
    """ONNX Runtime loads the quantised graph at ``path`` and runs it on a probe batch: what
    quantize_static writes is not always loadable (a graph quantised twice repeats node
    names), and a broken file must replace nothing."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {graph_input.name: _probe_batch(graph_input)})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"the quantised model does not run ({exc})") from None


def _calibrate(
    model: Path,
    tmp: Path,
    input_name: str,
    batches: Sequence[NDArray[np.float32]],
    method: str,
) -> dict[str, tuple[np.float32, np.float32]]:
    """Activation ranges of ``model``'s tensors feeding the quantised ops, on ``batches``."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(
        model, list(QUANTISED_OPS), augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method={
            "minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[method],
        providers=["CPUExecutionProvider"],
    )  # fmt: skip
    calibrator.collect_data(_Reader(input_name, list(batches)))
    data = calibrator.compute_data()
    return {name: _scalar_range(data[name].range_value) for name in data}


def _scalar_range(pair: Any) -> tuple[np.float32, np.float32]:
    lo, hi = (np.float32(np.asarray(v).reshape(-1)[0]) for v in pair)
    return lo, hi


def _ranges_json(
    found: dict[str, tuple[np.float32, np.float32]],
) -> dict[str, Any]:
    return {
        "format": RANGES_FORMAT,
        "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in sorted(found.items())},
    }


def _read_ranges(path: Path) -> dict[str, tuple[np.float32, np.float32]]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != RANGES_FORMAT:
            raise ValueError(f"not a {RANGES_FORMAT} file")
        return {str(name): _scalar_range(pair) for name, pair in data["ranges"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable activation ranges ({exc})") from None


def _probe_batch(graph_input: Any) -> NDArray[np.float32]:
    """A zero batch the graph accepts: fixed dims kept, a free batch dim 1, free sides 64 px
    (a multiple of every stride here)."""
    dims = graph_input.type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else (1 if i == 0 else 64) for i, d in enumerate(dims)]
    return np.zeros(shape, np.float32)


def quantize_model(
    model_dir: Path,
    calibration: Path,
    out_dir: Path,
    config: QuantizeConfig = QuantizeConfig(),
    overwrite: bool = False,
) -> ModelCard:
    """Write a static-int8 (QDQ) copy of ``model_dir`` to ``out_dir`` and return its card
    (a model already in ``out_dir`` is refused unless ``overwrite``)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    card = read_card(model_dir)
    if "int8" in card.kind:
        raise ModelError(
            f"{model_dir}: already an int8 model ({card.kind}); quantize its float model"
        )
    if Path(out_dir).resolve() == model_dir.resolve():
        raise ModelError(f"{out_dir} is the model to quantize: write the int8 copy elsewhere")
    check_out_dir(out_dir, overwrite)
    paths = calibration_paths(calibration)
    if not paths:
        raise ConfigError(f"{calibration}: no calibration images")
    random.Random(config.seed).shuffle(paths)
    paths = paths[: config.max_images]
    started = time.perf_counter()
    batches = _load_batches(paths, card.input_size, config, card.normalisation)
    out_dir.mkdir(parents=True, exist_ok=True)
    quantize_onnx(model_dir / MODEL_FILE, out_dir / MODEL_FILE, batches, config)
    n_images = sum(len(b) for b in batches)
    quantized = dataclasses.replace(
        card,
        name=f"{card.name}-int8",
        onnx_sha256=sha256_file(out_dir / MODEL_FILE),
        kind=f"{card.kind}+int8-static-qdq",
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        training={
            **card.training,
            "quantization": {
                "source_model_id": card.model_id, "format": "QDQ",
                "activations": config.activations, "float_ends": config.keep_ends_float,
                "weights": "int8", "per_channel": config.per_channel, "method": config.method,
                "calibration": str(calibration), "calibration_images": n_images,
                "ops": list(QUANTISED_OPS),
            },
        },
    )  # fmt: skip
    write_card(out_dir, quantized)
    log.info("quantised %s -> %s (%d calibration images, %.0f s)", card.model_id,
             quantized.model_id, n_images, time.perf_counter() - started)  # fmt: skip
    return quantized


def quantize(
    model: str | os.PathLike[str] | None,
    calibration: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    **options: Any,
) -> ModelCard:
    """``model``: a model directory or backbone name (exported on first use)."""
    from snapshop.models.export import resolve_model_dir

    return quantize_model(
        resolve_model_dir(model),
        Path(calibration),
        Path(out_dir),
        QuantizeConfig(**options),
        overwrite=overwrite,
    )
