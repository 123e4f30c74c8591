"""Retrieval metrics: Recall@K and mAP@R, computed exactly from embeddings.

Product-level R@K: a query hits at K when its product is among the top K *products* (products
ranked by their best-scoring gallery image). Image-level R@K: a hit when one of the top K
gallery *images* is of its product, as in the In-shop / Street2Shop tables of the literature.
The two agree at K = 1 and when every product has one gallery image; with several images per
product, image-level R@K (K > 1) is the lower of the two.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.errors import ConfigError, ImageDecodeError, ModelError
from snapshop.evaluate.stats import ratio_interval
from snapshop.images import load_image

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 100)


def product_scores(
    sims: NDArray[np.float32], gallery_labels: NDArray[np.int64], n_products: int
) -> NDArray[np.float32]:
    """(Q, G) image similarities -> (Q, P) product similarities (max over each product's images)."""
    out = np.full((sims.shape[0], n_products), -np.inf, dtype=np.float32)
    for p in range(n_products):
        cols = np.flatnonzero(gallery_labels == p)
        if len(cols):
            out[:, p] = sims[:, cols].max(axis=1)
    return out


def recall_at_k(
    product_sims: NDArray[np.float32], query_labels: NDArray[np.int64], ks: Sequence[int]
) -> dict[int, float]:
    """Fraction of queries whose product ranks within the top K products.

    Ties are broken against the query (a tied wrong product counts as ranked ahead).
    """
    rank = product_ranks(product_sims, query_labels)
    return {k: float((rank < k).mean()) for k in ks}


def product_ranks(
    product_sims: NDArray[np.float32], query_labels: NDArray[np.int64]
) -> NDArray[np.int64]:
    """0-based rank of each query's product among all products, pessimistic on ties and on NaN
    scores (a NaN competitor ranks ahead; a NaN score of the query's own product ranks it
    last, past every K: a broken model must not score as a perfect one)."""
    rows = np.arange(len(query_labels))
    true = product_sims[rows, query_labels]
    ahead = (product_sims >= true[:, None]) | np.isnan(product_sims)
    return np.where(np.isnan(true), product_sims.shape[1], ahead.sum(axis=1) - 1)


def image_ranks(
    sims: NDArray[np.float32], query_labels: NDArray[np.int64], gallery_labels: NDArray[np.int64]
) -> NDArray[np.int64]:
    """0-based rank of each query's first gallery image of its product among all gallery
    images: the number of other products' images scoring at least as high as its best one
    (pessimistic on ties, as :func:`product_ranks`). A query whose product has no gallery image
    gets rank G (never a hit), as does one whose best score is NaN; a NaN image of another
    product ranks ahead."""
    relevant = gallery_labels[None, :] == query_labels[:, None]
    best = np.where(relevant, sims, -np.inf).max(axis=1)
    ranks = (((sims >= best[:, None]) | np.isnan(sims)) & ~relevant).sum(axis=1)
    return np.where(np.isfinite(best), ranks, sims.shape[1]).astype(np.int64)


def recall_interval(
    ranks: NDArray[np.int64],
    query_labels: NDArray[np.int64],
    k: int,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of Recall@K, resampling *products* with all their queries.

    Photos of one product succeed or fail together, so resampling single queries would make
    the interval far too narrow when there are few products (16 held-out ones, say)."""
    products, inverse = np.unique(query_labels, return_inverse=True)
    hits = np.bincount(inverse, weights=(ranks < k).astype(np.float64), minlength=len(products))
    counts = np.bincount(inverse, minlength=len(products))
    return ratio_interval(hits, counts, level, resamples, seed)


def map_at_r(
    sims: NDArray[np.float32], query_labels: NDArray[np.int64], gallery_labels: NDArray[np.int64]
) -> float:
    """Image-level mAP@R (Musgrave et al. 2020); R = the query product's gallery image count.

    Queries with no gallery image of their product are left out. Ties are broken against the
    query (tied irrelevant images rank first), as in :func:`recall_at_k`, and so are NaN scores
    (a NaN irrelevant image ranks first, a NaN relevant one last).
    """
    values = []
    for q in range(len(query_labels)):
        relevant = gallery_labels == query_labels[q]
        r = int(relevant.sum())
        if r == 0:
            continue
        score = np.where(np.isnan(sims[q]), np.where(relevant, -np.inf, np.inf), sims[q])
        order = np.lexsort((relevant, -score))  # by score, then irrelevant before relevant
        hits = relevant[order[:r]]
        precision = np.cumsum(hits) / np.arange(1, r + 1)
        values.append(float((precision * hits).sum() / r))
    return float(np.mean(values)) if values else 0.0


@dataclass
class RetrievalReport:
    name: str
    recall: dict[int, float]  # product-level
    map_at_r: float
    n_queries: int
    n_gallery: int
    n_products: int
    embed_ms_per_image: float
    search_ms_per_query: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # 95 % bootstrap interval of each Recall@K over products (see recall_interval)
    recall_ci: dict[int, tuple[float, float]] = field(default_factory=dict)
    # query/gallery vectors, paths and products (evaluate_manifest fills it; for plots)
    vectors: dict[str, Any] | None = field(default=None, repr=False)
    # image-level Recall@K (see image_ranks)
    image_recall: dict[int, float] = field(default_factory=dict)
    # queries left out of every metric: their product has no gallery image to find
    queries_without_gallery: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recall": {f"R@{k}": round(v, 4) for k, v in self.recall.items()},
            "recall_ci95": {
                f"R@{k}": [round(lo, 4), round(hi, 4)] for k, (lo, hi) in self.recall_ci.items()
            },
            "image_recall": {f"R@{k}": round(v, 4) for k, v in self.image_recall.items()},
            "mAP@R": round(self.map_at_r, 4),
            "queries": self.n_queries,
            "queries_without_gallery": self.queries_without_gallery,
            "gallery": self.n_gallery,
            "products": self.n_products,
            "embed_ms_per_image": round(self.embed_ms_per_image, 2),
            "search_ms_per_query": round(self.search_ms_per_query, 3),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def embed_paths(
    embedder: Any, paths: Sequence[str], batch: int = 32
) -> tuple[NDArray[np.float32], list[int], list[tuple[str, str]], float]:
    """Embed image files; returns (vectors, kept positions, skipped, ms per image)."""
    vectors, kept, skipped = [], [], []
    elapsed = 0.0
    for start in range(0, len(paths), batch):
        images, idx = [], []
        for i in range(start, min(start + batch, len(paths))):
            try:
                images.append(load_image(paths[i]))
                idx.append(i)
            except ImageDecodeError as exc:
                skipped.append((str(paths[i]), exc.reason))
        if images:
            t = time.perf_counter()
            vectors.append(embedder.embed_images(images))
            elapsed += time.perf_counter() - t
            kept += idx
    dim = embedder.dim
    vecs = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    broken = np.flatnonzero(~np.isfinite(vecs).all(axis=1))
    if len(broken):
        raise ModelError(
            f"{paths[kept[broken[0]]]}: the model embeds it as NaN or infinity"
            f" ({len(broken)} of {len(kept)} images): a diverged training?"
        )
    return vecs, kept, skipped, 1e3 * elapsed / max(len(kept), 1)


def _check_cutoffs(ks: Sequence[int]) -> None:
    if not ks or min(ks) < 1:
        raise ConfigError(f"recall cut-offs K must be >= 1, got {sorted(ks)}")


def evaluate_embeddings(
    name: str,
    query_vecs: NDArray[np.float32],
    query_products: Sequence[str],
    gallery_vecs: NDArray[np.float32],
    gallery_products: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    embed_ms: float = 0.0,
) -> RetrievalReport:
    """Recall@K and mAP@R from embeddings; search time measured on an exact index, per query.

    A query whose product has no gallery image cannot be found: it is left out of every
    metric, as :func:`map_at_r` and cross-validation's photo -> catalog protocol leave it out,
    and counted in ``queries_without_gallery`` (with a warning) so that a gallery filter
    that removes most products does not pass for a perfect score."""
    _check_cutoffs(ks)
    if len(query_vecs) == 0 or len(gallery_vecs) == 0:
        raise ConfigError("evaluation needs at least one query and one gallery image")
    if not (np.isfinite(query_vecs).all() and np.isfinite(gallery_vecs).all()):
        raise ConfigError("the query or gallery vectors hold NaN or infinity")
    products = sorted(set(gallery_products))
    pid = {p: i for i, p in enumerate(products)}
    keep = [i for i, p in enumerate(query_products) if p in pid]
    if not keep:
        raise ConfigError("no query's product has a gallery image")
    left_out = len(query_products) - len(keep)
    if left_out:
        log.warning(
            "%s: %d of %d queries have no gallery image of their product; left out of the metrics",
            name,
            left_out,
            len(query_products),
        )
    q_vecs = query_vecs[keep]
    q_labels = np.array([pid[query_products[i]] for i in keep], dtype=np.int64)
    g_labels = np.array([pid[p] for p in gallery_products], dtype=np.int64)
    sims = q_vecs @ gallery_vecs.T
    ranks = product_ranks(product_scores(sims, g_labels, len(products)), q_labels)
    recall = {k: float((ranks < k).mean()) for k in ks}
    recall_ci = {k: recall_interval(ranks, q_labels, k) for k in ks}
    by_image = image_ranks(sims, q_labels, g_labels)

    from snapshop.index.flat import FlatIndex

    index = FlatIndex(gallery_vecs.shape[1])
    index.add(np.arange(len(gallery_vecs), dtype=np.int64), gallery_vecs)
    k_search = min(len(gallery_vecs), max(ks) * 4)
    t = time.perf_counter()
    for q in q_vecs:
        index.search(q[None, :], k_search)
    search_ms = 1e3 * (time.perf_counter() - t) / len(q_vecs)
    return RetrievalReport(
        name=name,
        recall=recall,
        map_at_r=map_at_r(sims, q_labels, g_labels),
        n_queries=len(keep),
        n_gallery=len(gallery_vecs),
        n_products=len(products),
        embed_ms_per_image=embed_ms,
        search_ms_per_query=search_ms,
        recall_ci=recall_ci,
        image_recall={k: float((by_image < k).mean()) for k in ks},
        queries_without_gallery=left_out,
    )


def evaluate_manifest(
    manifest: Any,
    model: str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    query_where: dict[str, str] | None = None,
    gallery_where: dict[str, str] | None = None,
    name: str | None = None,
) -> RetrievalReport:
    """Embed a manifest's query and gallery images with ``model`` and score retrieval."""
    from snapshop.data.manifest import ManifestRow, check_no_self_matches, matches, read_manifest
    from snapshop.models.embedder import load_embedder

    _check_cutoffs(ks)
    rows: list[ManifestRow] = manifest if isinstance(manifest, list) else read_manifest(manifest)
    queries = [r for r in rows if r.role == "query" and matches(r, query_where or {})]
    gallery = [r for r in rows if r.role == "gallery" and matches(r, gallery_where or {})]
    if not queries or not gallery:
        raise ConfigError(
            f"manifest selection has {len(queries)} queries and {len(gallery)} gallery images"
        )
    check_no_self_matches(queries + gallery, "the evaluation rows")
    embedder = load_embedder(model)
    q_vecs, q_kept, q_skip, q_ms = embed_paths(embedder, [str(r.path) for r in queries])
    g_vecs, g_kept, g_skip, g_ms = embed_paths(embedder, [str(r.path) for r in gallery])
    n = len(q_kept) + len(g_kept)
    embed_ms = (q_ms * len(q_kept) + g_ms * len(g_kept)) / max(n, 1)
    report = evaluate_embeddings(
        name or embedder.card.name,
        q_vecs,
        [queries[i].sku for i in q_kept],
        g_vecs,
        [gallery[i].sku for i in g_kept],
        ks,
        embed_ms,
    )
    in_gallery = {gallery[i].sku for i in g_kept}
    unanswerable = [
        (str(queries[i].path), f"query left out: no gallery image of product {queries[i].sku}")
        for i in q_kept
        if queries[i].sku not in in_gallery
    ]
    report.skipped = q_skip + g_skip + unanswerable
    report.vectors = {
        "query_vecs": q_vecs,
        "query_paths": [str(queries[i].path) for i in q_kept],
        "query_products": [queries[i].sku for i in q_kept],
        "gallery_vecs": g_vecs,
        "gallery_paths": [str(gallery[i].path) for i in g_kept],
        "gallery_products": [gallery[i].sku for i in g_kept],
    }
    return report


PLOT_KS = (1, 2, 4, 5, 8, 10, 16, 32, 64, 100)  # the recall-vs-K curve's points


@dataclass
class ModelComparison:
    """One report per model; ``cutoffs`` are the K asked for (reports may hold more, the
    plot's)."""

    cutoffs: tuple[int, ...]
    reports: list[RetrievalReport]


def compare_models(
    manifest: Path,
    models: Sequence[str | None] = (None,),
    ks: Sequence[int] | None = None,
    query_where: Sequence[str] = (),
    gallery_where: Sequence[str] = (),
    plot: Path | None = None,
    grid: Path | None = None,
) -> ModelComparison:
    """:func:`evaluate_manifest` for each model (None: the default backbone) on the same rows
    (``COLUMN=VALUE`` filters); with ``plot`` a PNG of recall vs K, one line per model (K up to
    the product count), with ``grid`` a PNG of queries and their top-5 results."""
    from snapshop.data.manifest import parse_where
    from snapshop.evaluate.plots import check_png_path

    if plot:
        check_png_path(plot, "recall plot")
    if grid:
        check_png_path(grid, "result grid")
        if plot and Path(plot).resolve() == Path(grid).resolve():
            raise ConfigError(f"{plot}: the recall plot and the result grid need two files")
    cutoffs = tuple(sorted(set(ks))) if ks else DEFAULT_KS
    asked = tuple(sorted(set(cutoffs) | set(PLOT_KS if plot else ())))
    queries, gallery = parse_where(list(query_where)), parse_where(list(gallery_where))
    reports = [evaluate_manifest(manifest, m, asked, queries, gallery) for m in models]
    if plot:
        from snapshop.evaluate.plots import plot_recall

        shown = [  # K beyond the product count says nothing
            dataclasses.replace(r, recall={k: v for k, v in r.recall.items() if k <= r.n_products})
            for r in reports
        ]
        where = " ".join([*query_where, *gallery_where])
        plot_recall(shown, plot, f"{Path(manifest).name} {where}".strip())
    if grid:
        from snapshop.evaluate.plots import plot_grid

        plot_grid(reports, grid)
    return ModelComparison(cutoffs, reports)
