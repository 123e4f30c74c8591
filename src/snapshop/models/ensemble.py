"""Several embedders as one model: one ONNX graph, one card, one embedding space.

The merged graph feeds the same image to every member and returns the members' L2-normalised
vectors concatenated and scaled by 1/sqrt(n): the result is L2-normalised again, and the cosine
of two such vectors is the mean of the members' cosines (the ensemble of ``benchmarks/
ensemble_cv.py``). Everything downstream (catalogs, indexes, services) treats it as one model.

Members that share a frozen trunk (two trainings of one backbone that fine-tuned only its last
blocks) hold byte-identical weights there: the merge stores each distinct weight once, so the
file does not double. Each member still runs in full: a query costs the members' embeddings
together.

A member that is itself a merged model counts as its members: ``merge(merge(a, c), b)`` weighs
``a``, ``b`` and ``c`` alike, as ``merge(a, b, c)`` does (each part is scaled by
sqrt(its members / all members) instead of one 1/sqrt(n)), and the card lists the three.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from snapshop.errors import ModelError
from snapshop.models.card import (
    MODEL_FILE,
    ModelCard,
    check_out_dir,
    read_card,
    sha256_file,
    write_card,
)
from snapshop.models.export import resolve_model_dir, save_onnx_checked

ENSEMBLE_KIND = "ensemble"
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
# card fields every member must agree on: the merged model preprocesses an image once
_SHARED_FIELDS = ("input_size", "normalisation", "resize")

log = logging.getLogger(__name__)


def merge_models(
    models: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
) -> ModelCard:
    """Write to ``out_dir`` one model that embeds with every model of ``models`` (two or more
    model directories or backbone names) and returns their ensemble vector; see the module doc.
    The members must embed at the same input size with the same preprocessing (bring them to
    one size with :func:`snapshop.models.export.resize_model` first)."""
    import onnx

    if len(models) < 2:
        raise ModelError(f"an ensemble needs at least two models, got {len(models)}")
    dirs = [resolve_model_dir(m) for m in models]
    if any(Path(out_dir).resolve() == d.resolve() for d in dirs):
        raise ModelError(f"{out_dir} is one of the members: write the merged model elsewhere")
    cards = [read_card(d) for d in dirs]
    _check_compatible(dirs, cards)
    _warn_repeated(dirs, cards)
    check_out_dir(out_dir, overwrite)
    graphs = [_load_checked(d, c) for d, c in zip(dirs, cards, strict=True)]

    nodes: list[Any] = []
    initializers: dict[str, Any] = {}
    canonical: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    outputs: list[str] = []
    for i, graph in enumerate(graphs):
        prefixed = onnx.compose.add_prefix(graph, f"m{i}/")
        renames = {prefixed.graph.input[0].name: INPUT_NAME}
        for init in prefixed.graph.initializer:
            key = (init.data_type, tuple(init.dims), _tensor_bytes(init))
            if key in canonical:
                renames[init.name] = canonical[key]
            else:
                canonical[key] = init.name
                initializers[init.name] = init
        for node in prefixed.graph.node:
            for j, name in enumerate(node.input):
                node.input[j] = renames.get(name, name)
            nodes.append(node)
        outputs.append(prefixed.graph.output[0].name)

    counts = [len(_leaves(d, c)) for d, c in zip(dirs, cards, strict=True)]
    weights = [math.sqrt(n / sum(counts)) for n in counts]
    if len(set(counts)) == 1:  # every member alike: one number, 1/sqrt(n)
        scale = onnx.helper.make_tensor("ensemble/scale", onnx.TensorProto.FLOAT, [], [weights[0]])
    else:
        per_column = [w for w, c in zip(weights, cards, strict=True) for _ in range(c.output_dim)]
        scale = onnx.helper.make_tensor(
            "ensemble/scale", onnx.TensorProto.FLOAT, [len(per_column)], per_column
        )
    nodes.append(onnx.helper.make_node("Concat", outputs, ["ensemble/concat"], axis=1))
    nodes.append(onnx.helper.make_node("Mul", ["ensemble/concat", "ensemble/scale"], [OUTPUT_NAME]))
    size, dim = cards[0].input_size, sum(c.output_dim for c in cards)
    graph = onnx.helper.make_graph(
        nodes,
        "ensemble",
        [onnx.helper.make_tensor_value_info(
            INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", 3, size, size])],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", dim])],
        [*initializers.values(), scale],
    )  # fmt: skip
    merged = onnx.helper.make_model(graph, opset_imports=_opsets(graphs), producer_name="snapshop")
    merged.ir_version = max(g.ir_version for g in graphs)

    out = Path(out_dir)
    widths = [c.output_dim for c in cards]
    save_onnx_checked(merged, out, lambda path: _check_runs(path, size, widths, weights))
    card = ModelCard(
        name="ensemble(" + "+".join(c.name for c in cards) + ")",
        backbone="+".join(c.backbone for c in cards),
        input_size=size,
        output_dim=dim,
        source_weights_sha256=hashlib.sha256(
            "".join(c.onnx_sha256 for c in cards).encode()
        ).hexdigest(),
        onnx_sha256=sha256_file(out / MODEL_FILE),
        normalisation=dict(cards[0].normalisation),
        resize=cards[0].resize,
        kind=ENSEMBLE_KIND,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        training={"members": [m for d, c in zip(dirs, cards, strict=True) for m in _leaves(d, c)]},
    )
    write_card(out, card)
    return card


def _check_compatible(dirs: list[Path], cards: list[ModelCard]) -> None:
    first = cards[0]
    for path, card in zip(dirs, cards, strict=True):
        if not card.l2_normalised:
            raise ModelError(f"{path}: its vectors are not L2-normalised; cannot be a member")
        if "int8" in card.kind:
            raise ModelError(f"{path}: an int8 model; merge the float models, then quantize")
        for field in _SHARED_FIELDS:
            if getattr(card, field) != getattr(first, field):
                raise ModelError(
                    f"the members disagree on {field}: {getattr(first, field)!r} ({dirs[0]})"
                    f" vs {getattr(card, field)!r} ({path});"
                    " `snapshop resize-model` brings a model to another input size"
                )


def _warn_repeated(dirs: list[Path], cards: list[ModelCard]) -> None:
    """One graph twice ranks exactly as it alone (a check the tests use) at twice the cost."""
    seen: dict[str, Path] = {}
    for path, card in zip(dirs, cards, strict=True):
        if card.onnx_sha256 in seen:
            log.warning("%s and %s are the same model: the merge ranks as it alone, at twice"
                        " the cost a query", path, seen[card.onnx_sha256])  # fmt: skip
        seen[card.onnx_sha256] = path


def _load_checked(model_dir: Path, card: ModelCard) -> Any:
    import onnx

    path = model_dir / MODEL_FILE
    try:
        graph = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and OSError subclasses of its own
        raise ModelError(f"{path}: cannot read the ONNX model ({exc})") from None
    if sha256_file(path) != card.onnx_sha256:
        raise ModelError(f"{path}: does not match its card's checksum (modified or damaged)")
    if len(graph.graph.input) != 1 or len(graph.graph.output) != 1:
        raise ModelError(f"{path}: an embedder has one input and one output")
    # the shapes the Embedder checks: a member it would refuse must not enter unnoticed,
    # embedding at its card's size inside the ensemble instead of the size it was made for
    wanted = {"input": [0, 3, card.input_size, card.input_size], "output": [0, card.output_dim]}
    for what, value in (("input", graph.graph.input[0]), ("output", graph.graph.output[0])):
        got = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if len(got) != len(wanted[what]) or any(
            g and w and g != w for g, w in zip(got, wanted[what], strict=True)
        ):
            raise ModelError(
                f"{path}: the graph's {what} shape {got} does not match its card"
                f" (input_size {card.input_size}, output_dim {card.output_dim})"
            )
    return graph


def _tensor_bytes(tensor: Any) -> bytes:
    from onnx import numpy_helper

    return bytes(numpy_helper.to_array(tensor).tobytes())


def _opsets(graphs: list[Any]) -> list[Any]:
    import onnx

    versions: dict[str, int] = {}
    for graph in graphs:
        for opset in graph.opset_import:
            # an operator's meaning can change between opsets (ReduceMean's axes at 18)
            if versions.setdefault(opset.domain, opset.version) != opset.version:
                raise ModelError(
                    f"the members were exported at different ONNX opsets of"
                    f" {opset.domain or 'ai.onnx'} ({versions[opset.domain]}, {opset.version})"
                )
    return [onnx.helper.make_opsetid(domain, v) for domain, v in sorted(versions.items())]


def _check_runs(path: str, size: int, widths: list[int], weights: list[float]) -> None:
    """The merged graph runs, and each member's part of its vector has the length it is
    weighted by: a member whose card says L2-normalised but whose graph is not would outweigh
    the others."""
    import onnxruntime as ort

    dim = sum(widths)
    probe = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (vectors,) = session.run(None, {INPUT_NAME: probe})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"the merged model does not run ({exc})") from None
    if vectors.shape != (2, dim):
        raise ModelError(f"the merged model returns {vectors.shape}, expected (2, {dim})")
    ends = np.cumsum([0, *widths])
    for i, (start, stop) in enumerate(itertools.pairwise(ends)):
        norms = np.linalg.norm(vectors[:, start:stop], axis=1) / weights[i]
        if not np.allclose(norms, 1.0, atol=1e-3):
            raise ModelError(
                f"member {i + 1} returns vectors of length {norms.round(4).tolist()}, not 1:"
                " its card says L2-normalised, its graph is not"
            )


def _leaves(model_dir: Path, card: ModelCard) -> list[dict[str, Any]]:
    """The single models inside a member: its card's members if it is a merged model."""
    members = card.training.get("members") if card.kind == ENSEMBLE_KIND else None
    if isinstance(members, list) and members and all(isinstance(m, dict) for m in members):
        return members
    return [_member_summary(model_dir, card)]


def _member_summary(model_dir: Path, card: ModelCard) -> dict[str, Any]:
    keep = ("name", "backbone", "output_dim", "kind", "onnx_sha256")
    summary = {k: v for k, v in dataclasses.asdict(card).items() if k in keep}
    return {"model_id": card.model_id, "path": str(model_dir), **summary}
