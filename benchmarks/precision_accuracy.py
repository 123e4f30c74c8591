"""The retrieval accuracy cost of bf16 inference against fp32, paired (issue #16).

Every image of a manifest is embedded once in fp32 (ONNX Runtime's CPU provider) and once in
bf16 (the OpenVINO provider, the default precision) by the same model. Each protocol —
query photos -> the whole gallery, and query photos -> the catalog images only (the gallery
rows matching ``--catalog-where``, as ``snapshop evaluate --gallery-where domain=iconic``) —
is then scored by :func:`snapshop.evaluate.retrieval.evaluate_embeddings` for the four
combinations of query and gallery precision: the mixed ones are an old fp32 catalog searched by
new bf16 queries and the other way round. Each R@1 comes with its difference to fp32/fp32 and
that difference's paired 95 % bootstrap interval over products (the same products resampled
for both). A last table gives the cosine between each image's fp32 and bf16 vectors.

Vectors are cached under ``--cache`` (never in the repository), keyed by model, precision and
image list, so a rerun only scores. Results and commands:
docs/benchmarks/scale.md, "bf16: the accuracy cost (issue #16)".

    python benchmarks/precision_accuracy.py ../shared/datasets/grocery-dev/manifest.csv \
        --cache /tmp/snapshop-precision
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).parent))

from product_vectors import paired_difference  # noqa: E402

from snapshop.data.manifest import ManifestRow, matches, parse_where, read_manifest  # noqa: E402
from snapshop.errors import ConfigError, SnapshopError  # noqa: E402
from snapshop.evaluate.retrieval import (  # noqa: E402
    RetrievalReport,
    embed_paths,
    evaluate_embeddings,
    product_ranks,
    product_scores,
)
from snapshop.models.card import read_card  # noqa: E402
from snapshop.models.embedder import Embedder  # noqa: E402
from snapshop.models.export import resolve_model_dir  # noqa: E402

log = logging.getLogger("precision_accuracy")

PRECISIONS = ("fp32", "bf16")  # the first is the reference
KS = (1, 5, 10)


@dataclass(frozen=True)
class Embedded:
    """One precision's vectors of the manifest's distinct images (skipped ones left out)."""

    precision: str  # what the session ran (bf16 falls back to fp32 without OpenVINO)
    paths: list[str]
    vectors: NDArray[np.float32]  # (N, D), L2-normalised
    wall_ms: float  # per image, embedding only (decode excluded), as measured when computed
    cpu_ms: float  # the process's CPU time per image over the same calls


def embed_manifest(
    model_dir: Path, precision: str, paths: Sequence[str], parallel: int, cache: Path | None
) -> Embedded:
    """Every path embedded once with ``precision`` (cached when ``cache`` is given)."""
    if cache is not None:
        card = read_card(model_dir)
        key = json.dumps([card.onnx_sha256, precision, list(paths)])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        file = cache / f"{card.name}-{precision}-{digest}.npz"
        if file.exists():
            with np.load(file) as data:
                return Embedded(
                    str(data["precision"]),
                    data["paths"].tolist(),
                    data["vectors"],
                    float(data["wall_ms"]),
                    float(data["cpu_ms"]),
                )
    embedder = Embedder(model_dir, precision=precision, parallel=parallel)
    if embedder.precision != precision:
        log.warning("%s asked, %s ran (no OpenVINO provider here)", precision, embedder.precision)
    cpu = time.process_time()
    vectors, kept, skipped, wall_ms = embed_paths(embedder, list(paths))
    cpu_ms = 1e3 * (time.process_time() - cpu) / max(len(kept), 1)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    out = Embedded(embedder.precision, [paths[i] for i in kept], vectors, wall_ms, cpu_ms)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(
            file,
            precision=out.precision,
            paths=np.array(out.paths),
            vectors=out.vectors,
            wall_ms=out.wall_ms,
            cpu_ms=out.cpu_ms,
        )
    return out


@dataclass(frozen=True)
class Cell:
    """One protocol scored with one (query, gallery) precision pair."""

    protocol: str
    queries: str
    gallery: str
    report: RetrievalReport
    ranks: NDArray[np.int64]  # product rank of each kept query (0 = hit at 1)
    labels: NDArray[np.int64]  # each kept query's product


def score(
    protocol: str,
    query_precision: str,
    gallery_precision: str,
    queries: Sequence[ManifestRow],
    gallery: Sequence[ManifestRow],
    vectors: dict[str, dict[str, NDArray[np.float32]]],
    ks: Sequence[int],
) -> Cell:
    """The library's evaluation of one combination, plus each query's product rank (the same
    ranks it counts: checked) for the paired differences."""
    q_vecs = np.stack([vectors[query_precision][str(r.path)] for r in queries])
    g_vecs = np.stack([vectors[gallery_precision][str(r.path)] for r in gallery])
    q_products, g_products = [r.sku for r in queries], [r.sku for r in gallery]
    name = f"{protocol} {query_precision}/{gallery_precision}"
    report = evaluate_embeddings(name, q_vecs, q_products, g_vecs, g_products, ks)
    pid = {p: i for i, p in enumerate(sorted(set(g_products)))}
    keep = [i for i, p in enumerate(q_products) if p in pid]
    labels = np.array([pid[q_products[i]] for i in keep], np.int64)
    g_labels = np.array([pid[p] for p in g_products], np.int64)
    ranks = product_ranks(product_scores(q_vecs[keep] @ g_vecs.T, g_labels, len(pid)), labels)
    for k in ks:
        if float((ranks < k).mean()) != report.recall[k]:
            raise AssertionError(f"{name}: ranks disagree with the evaluation at R@{k}")
    return Cell(protocol, query_precision, gallery_precision, report, ranks, labels)


def cosine_rows(
    vectors: dict[str, dict[str, NDArray[np.float32]]], groups: dict[str, Sequence[str]]
) -> list[tuple[str, int, float, float, float]]:
    """(group, images, min, 1st percentile, median) of each image's fp32 · bf16 cosine."""
    rows = []
    for group, paths in groups.items():
        if not paths:
            continue
        cos = np.array([float(vectors["fp32"][p] @ vectors["bf16"][p]) for p in paths])
        rows.append((group, len(cos), float(cos.min()), *np.quantile(cos, [0.01, 0.5]).tolist()))
    return rows


def recall_table(cells: Sequence[Cell], ks: Sequence[int]) -> str:
    """Markdown: one row per (protocol, query precision, gallery precision)."""
    head = (
        "| protocol | queries | gallery | "
        + " | ".join(f"R@{k}" for k in ks)
        + " | R@1 95 % CI | ΔR@1 vs fp32/fp32 [paired 95 % CI] | top-1 hit changed |"
    )
    lines = [head, "|---|---|---|" + "---|" * len(ks) + "---|---|---|"]
    for cell in cells:
        base = next(c for c in cells if c.protocol == cell.protocol)
        delta, lo, hi = paired_difference(base.ranks, cell.ranks, cell.labels, 1)
        changed = int(((base.ranks == 0) != (cell.ranks == 0)).sum())
        r = cell.report
        lines.append(
            f"| {cell.protocol} | {cell.queries} | {cell.gallery} | "
            + " | ".join(f"{r.recall[k]:.4f}" for k in ks)
            + f" | {r.recall_ci[1][0]:.3f}–{r.recall_ci[1][1]:.3f}"
            + f" | {delta:+.4f} [{lo:+.4f}, {hi:+.4f}] | {changed} of {len(cell.ranks)} |"
        )
    return "\n".join(lines)


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="CSV with path, product_id, role.")
    parser.add_argument("--model", default="efficientnet_lite2", help="Backbone or model dir.")
    parser.add_argument("--cache", type=Path, default=None, help="Folder for the vectors.")
    parser.add_argument(
        "--catalog-where", nargs="*", default=["domain=iconic"], help="Catalog rows: COL=VALUE."
    )
    parser.add_argument("-k", type=int, nargs="+", default=list(KS), help="Recall cut-offs.")
    parser.add_argument(
        "--parallel", type=int, default=1, help="Embedding calls side by side (1: one core)."
    )
    args = parser.parse_args()
    ks = sorted(set(args.k))
    if 1 not in ks:
        raise ConfigError("the paired difference is of R@1: keep 1 among -k")

    rows = read_manifest(args.manifest)
    queries = [r for r in rows if r.role == "query"]
    gallery = [r for r in rows if r.role == "gallery"]
    catalog = [r for r in gallery if matches(r, parse_where(args.catalog_where))]
    if not queries or not gallery:
        raise ConfigError(f"{args.manifest}: needs query and gallery rows")
    paths = list(dict.fromkeys(str(r.path) for r in queries + gallery))
    model_dir = resolve_model_dir(args.model)

    embedded = {
        p: embed_manifest(model_dir, p, paths, args.parallel, args.cache) for p in PRECISIONS
    }
    kept = set(embedded["fp32"].paths) & set(embedded["bf16"].paths)
    vectors = {p: dict(zip(e.paths, e.vectors, strict=True)) for p, e in embedded.items()}
    queries, gallery, catalog = (
        [r for r in part if str(r.path) in kept] for part in (queries, gallery, catalog)
    )
    protocols = {"photo → all gallery": gallery}
    if catalog:
        protocols["photo → catalog"] = catalog
    cells = [
        score(name, qp, gp, queries, part, vectors, ks)
        for name, part in protocols.items()
        for qp in PRECISIONS
        for gp in PRECISIONS
    ]

    print(
        f"\n{args.manifest}: {len(queries)} query photos, {len(gallery)} gallery images"
        f" ({len(catalog)} catalog), model {args.model}\n"
    )
    print("| asked | ran | images | embed ms/image wall / CPU |")
    print("|---|---|---|---|")
    for p, e in embedded.items():
        print(f"| {p} | {e.precision} | {len(e.paths)} | {e.wall_ms:.1f} / {e.cpu_ms:.1f} |")
    print()
    print(recall_table(cells, ks))
    print("\nCosine between each image's fp32 and bf16 vectors:\n")
    print("| images | n | min | p1 | median |")
    print("|---|---|---|---|---|")
    groups = {
        "all": [p for p in paths if p in kept],
        "query photos": [str(r.path) for r in queries],
        "gallery photos": [str(r.path) for r in gallery if r not in catalog],
        "catalog images": [str(r.path) for r in catalog],
    }
    cosines = cosine_rows(vectors, groups)
    for group, n, low, p1, median in cosines:
        print(f"| {group} | {n} | {low:.5f} | {p1:.5f} | {median:.5f} |")
    return {"cells": cells, "cosines": cosines, "embedded": embedded}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except SnapshopError as exc:
        sys.exit(f"error: {exc}")
