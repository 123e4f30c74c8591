"""Cross-validated retrieval on unseen products: each fold's model scored on its own held-out
products, the ranks pooled over the folds, so every product of the dataset counts as unseen.

The folds are the protocol's (``snapshop prepare --folds K --fold N``, same seed and options
as the training side). Two protocols: photo -> the fold's whole held-out gallery, and photo ->
the fold's catalog images only (``catalog_where``). Columns: each baseline model (the same for
every fold, embedded once) and each set of fold models (one per fold, in fold order). R@K with
a 95 % bootstrap interval over products (all photos of a product resampled together), and each
column's R@1 minus the first trained column's, paired: the same products drawn for both, so
two recipes scored on the same held-out photos compare without their shared hard cases.
Image-level R@K (a hit when one of the top K gallery *images* is of the product, as the
literature's tables count) is reported beside the product-level R@K.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.data.manifest import (
    ManifestRow,
    RowSelection,
    check_no_self_matches,
    matches,
    parse_where,
    read_manifest,
    select_rows,
)
from snapshop.data.protocol import ProtocolConfig, split_products
from snapshop.errors import ConfigError
from snapshop.evaluate.retrieval import (
    embed_paths,
    image_ranks,
    product_ranks,
    product_scores,
    recall_interval,
)
from snapshop.evaluate.stats import paired_ratio_difference

log = logging.getLogger(__name__)

KS = (1, 2, 4, 5, 8, 10, 100)
IMAGE_KS = (5, 10)  # image-level rows of the tables (at K = 1 both levels agree)
PROTOCOLS = ("photo -> all", "photo -> catalog")
FOLD_MODELS = "trained (fold models)"


@dataclass
class PooledRanks:
    """Ranks of every query among its fold's held-out products, with global product labels."""

    ranks: list[NDArray[np.int64]] = field(default_factory=list)
    labels: list[NDArray[np.int64]] = field(default_factory=list)
    per_fold_r1: list[float] = field(default_factory=list)
    image_ranks: list[NDArray[np.int64]] = field(default_factory=list)

    def add(
        self,
        ranks: NDArray[np.int64],
        labels: NDArray[np.int64],
        image_ranks: NDArray[np.int64] | None = None,
    ) -> None:
        self.ranks.append(ranks)
        self.labels.append(labels)
        self.per_fold_r1.append(float((ranks < 1).mean()))
        if image_ranks is not None:
            self.image_ranks.append(image_ranks)

    def recall(self, k: int) -> tuple[float, tuple[float, float]]:
        ranks, labels = np.concatenate(self.ranks), np.concatenate(self.labels)
        return float((ranks < k).mean()), recall_interval(ranks, labels, k)

    @property
    def has_image_ranks(self) -> bool:
        """Every fold added its queries' image-level ranks."""
        return bool(self.ranks) and len(self.image_ranks) == len(self.ranks)

    def image_recall(self, k: int) -> tuple[float, tuple[float, float]]:
        """Image-level R@K and its interval over products (see :attr:`has_image_ranks`)."""
        if not self.has_image_ranks:
            raise ConfigError("image-level ranks were not added for every fold")
        ranks, labels = np.concatenate(self.image_ranks), np.concatenate(self.labels)
        return float((ranks < k).mean()), recall_interval(ranks, labels, k)

    def product_hits(
        self, k: int
    ) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.int64]]:
        """Per product (sorted global labels): its label, its queries' hits at K, its queries."""
        products, inverse = np.unique(np.concatenate(self.labels), return_inverse=True)
        hits = np.bincount(inverse, weights=(np.concatenate(self.ranks) < k).astype(np.float64))
        return products, hits.astype(np.float64), np.bincount(inverse).astype(np.int64)

    @property
    def queries(self) -> int:
        return int(sum(len(r) for r in self.ranks))

    @property
    def products(self) -> int:
        return len(np.unique(np.concatenate(self.labels))) if self.labels else 0


def fold_ranks(
    query_vecs: NDArray[np.float32],
    query_products: Sequence[str],
    gallery_vecs: NDArray[np.float32],
    gallery_products: Sequence[str],
    label_of: dict[str, int],
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """0-based product rank of each query within this gallery, the queries' global labels, and
    each query's image-level rank (:func:`~snapshop.evaluate.retrieval.image_ranks`).

    Every query's product must be in the gallery (a fold holds out whole products)."""
    return similarity_ranks(query_vecs @ gallery_vecs.T, query_products, gallery_products, label_of)


def similarity_ranks(
    sims: NDArray[np.float32],
    query_products: Sequence[str],
    gallery_products: Sequence[str],
    label_of: dict[str, int],
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """:func:`fold_ranks` from a (queries, gallery images) score matrix (e.g. re-ranked)."""
    products = sorted(set(gallery_products))
    local = {p: i for i, p in enumerate(products)}
    missing = sorted(set(query_products) - set(local))
    if missing:
        raise ValueError(f"queries of products without a gallery image: {missing[:5]}")
    q_local = np.array([local[p] for p in query_products], dtype=np.int64)
    g_local = np.array([local[p] for p in gallery_products], dtype=np.int64)
    ranks = product_ranks(product_scores(sims, g_local, len(products)), q_local)
    labels = np.array([label_of[p] for p in query_products], dtype=np.int64)
    return ranks, labels, image_ranks(sims, q_local, g_local)


def held_out_folds(
    rows: list[ManifestRow],
    folds: int,
    *,
    seed: int = 0,
    min_images: int = 2,
    max_images: int = 0,
    keep_roles: bool = True,
) -> list[list[ManifestRow]]:
    """The test rows of each of ``folds`` protocol folds (as ``snapshop prepare --folds`` with
    the same seed and image limits: other limits keep other products, so other folds)."""
    held_out = []
    for fold in range(folds):
        config = ProtocolConfig(
            min_images=min_images, max_images=max_images, seed=seed, keep_roles=keep_roles,
            folds=folds, fold=fold,
        )  # fmt: skip
        split, _ = split_products(rows, config)
        held_out.append([r for r in split if r.extra["split"] == "test"])
        check_no_self_matches(held_out[-1], f"fold {fold}'s held-out rows")
    return held_out


@dataclass
class CrossValidation:
    """Pooled ranks per column (model) and protocol."""

    folds: int
    columns: list[str]
    results: dict[str, dict[str, PooledRanks]]
    reference: str = ""  # the others' paired differences are to this column (none when empty)

    def protocols(self) -> list[str]:
        """The protocols some query was scored in (a dataset without catalog images has one)."""
        return [p for p in PROTOCOLS if self.results[self.columns[0]][p].queries]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """column -> protocol -> R@K {value, ci95} and per_fold_R@1."""
        report: dict[str, dict[str, Any]] = {}
        for protocol in self.protocols():
            for name in self.columns:
                pooled = self.results[name][protocol]
                entry: dict[str, Any] = {}
                for k in KS:
                    value, (lo, hi) = pooled.recall(k)
                    interval = [round(lo, 4), round(hi, 4)]
                    entry[f"R@{k}"] = {"value": round(value, 4), "ci95": interval}
                if pooled.has_image_ranks:
                    for k in KS[1:]:
                        value, (lo, hi) = pooled.image_recall(k)
                        interval = [round(lo, 4), round(hi, 4)]
                        entry[f"image R@{k}"] = {"value": round(value, 4), "ci95": interval}
                entry["per_fold_R@1"] = pooled.per_fold_r1
                if self.reference and name != self.reference:
                    delta, lo, hi = self.paired_difference(self.reference, name, protocol)
                    entry[f"R@1 - {self.reference}"] = {
                        "value": round(delta, 4),
                        "ci95": [round(lo, 4), round(hi, 4)],
                    }
                report.setdefault(name, {})[protocol] = entry
        return report

    def markdown(self) -> list[str]:
        """One markdown table per protocol: R@K per column (95 % interval at K 1, 5, 10)."""
        lines = []
        for protocol in PROTOCOLS:
            first = self.results[self.columns[0]][protocol]
            if not first.queries:
                lines += ["", f"{protocol}: no query has a gallery image of its product (skipped)"]
                continue
            lines += [
                "",
                f"{protocol}: {self.folds} folds, {first.products} products,"
                f" {first.queries} queries, pooled",
            ]
            lines.append("| metric | " + " | ".join(self.columns) + " |")
            lines.append("|---" * (len(self.columns) + 1) + "|")
            for k in KS:
                cells = []
                for name in self.columns:
                    value, (lo, hi) = self.results[name][protocol].recall(k)
                    cells.append(
                        f"{value:.4f} [{lo:.3f}, {hi:.3f}]" if k in (1, 5, 10) else f"{value:.4f}"
                    )
                lines.append(f"| R@{k} | " + " | ".join(cells) + " |")
            if all(self.results[name][protocol].has_image_ranks for name in self.columns):
                for k in IMAGE_KS:
                    cells = []
                    for name in self.columns:
                        value, (lo, hi) = self.results[name][protocol].image_recall(k)
                        cells.append(f"{value:.4f} [{lo:.3f}, {hi:.3f}]")
                    lines.append(f"| image R@{k} | " + " | ".join(cells) + " |")
            cells = [
                " / ".join(f"{r:.3f}" for r in self.results[name][protocol].per_fold_r1)
                for name in self.columns
            ]
            lines.append("| R@1 per fold | " + " | ".join(cells) + " |")
            if self.reference and len(self.columns) > 1:
                cells = []
                for name in self.columns:
                    if name == self.reference:
                        cells.append("-")
                        continue
                    delta, lo, hi = self.paired_difference(self.reference, name, protocol)
                    cells.append(f"{delta:+.4f} [{lo:+.3f}, {hi:+.3f}]")
                lines.append(f"| R@1 - {self.reference}, paired | " + " | ".join(cells) + " |")
        return lines

    def paired_difference(
        self, base: str, variant: str, protocol: str, k: int = 1
    ) -> tuple[float, float, float]:
        """``variant``'s R@K minus ``base``'s, with a 95 % bootstrap interval that draws the same
        products for both columns (they were scored on the same held-out queries)."""
        base_products, base_hits, base_queries = self.results[base][protocol].product_hits(k)
        products, hits, queries = self.results[variant][protocol].product_hits(k)
        if not np.array_equal(base_products, products) or not np.array_equal(base_queries, queries):
            raise ConfigError(f"{base} and {variant} were not scored on the same queries")
        return paired_ratio_difference((base_hits, base_queries), (hits, queries))


def check_catalog_known(
    model: str, training: dict[str, Any], held_out: list[ManifestRow], catalog: dict[str, str]
) -> None:
    """The "catalog known" protocol (issue #20): a model may have trained on the held-out
    products' catalog images (``catalog``), which a shop has before any shopper photo, but on
    no other image of them. Checked against the training manifest its card names, read with
    ``snapshop train``'s default row selection (``split=train``); raises :class:`ConfigError`
    otherwise."""
    data = Path(str(training.get("data", "")))
    if not data.is_file():
        raise ConfigError(f"{model}: its training manifest {str(data)!r} is not here to check")
    train_rows, _, _ = select_rows(read_manifest(data), RowSelection())
    held = {r.sku for r in held_out}
    seen = [r for r in train_rows if r.sku in held and not matches(r, catalog)]
    if seen:
        raise ConfigError(
            f"{model} trained on {len(seen)} images of held-out products that are not catalog"
            f" images (e.g. {seen[0].path}): not the catalog-known protocol"
        )
    catalog_paths = {Path(r.path).resolve() for r in held_out if matches(r, catalog)}
    if not catalog_paths & {Path(r.path).resolve() for r in train_rows}:
        raise ConfigError(f"{model}: no held-out catalog image in its training rows")


def _score_column(
    models: Sequence[str],
    fold_rows: list[list[ManifestRow]],
    catalog: dict[str, str],
    label_of: dict[str, int],
    catalog_known: bool = False,
) -> dict[str, PooledRanks]:
    """One column: model ``models[i]`` embeds fold ``i``'s held-out rows (each image once per
    model), ranked in both protocols. ``catalog_known``: the model may have trained on the
    held-out products' catalog images (:func:`check_catalog_known`)."""
    from snapshop.models.embedder import load_embedder

    pooled = {protocol: PooledRanks() for protocol in PROTOCOLS}
    cache: dict[tuple[str, str], NDArray[np.float32]] = {}
    for model, held_out in zip(models, fold_rows, strict=True):
        embedder = load_embedder(model)
        trained_on = set(embedder.card.training.get("classes", []))
        if trained_on & {r.sku for r in held_out}:
            if catalog_known:
                check_catalog_known(model, embedder.card.training, held_out, catalog)
            else:
                raise ConfigError(
                    f"{model} was trained on products this fold holds out: "
                    "not the same folds (seed, --max-images, --keep-roles?)"
                )
        paths = [str(r.path) for r in held_out]
        todo = [p for p in paths if (model, p) not in cache]
        vecs, kept, skipped, _ = embed_paths(embedder, todo)
        if skipped:
            log.warning("%d unreadable images skipped", len(skipped))
        for vec, i in zip(vecs, kept, strict=True):
            cache[(model, todo[i])] = vec
        present = [r for r in held_out if (model, str(r.path)) in cache]

        def vectors(rows: list[ManifestRow], model: str = model) -> NDArray[np.float32]:
            return np.stack([cache[(model, str(r.path))] for r in rows])

        queries = [r for r in present if r.role == "query"]
        gallery = [r for r in present if r.role == "gallery"]
        galleries = {
            "photo -> all": gallery,
            "photo -> catalog": [r for r in gallery if matches(r, catalog)],
        }
        for protocol, shown in galleries.items():
            in_gallery = {r.sku for r in shown}
            asked = [r for r in queries if r.sku in in_gallery]
            if not asked:  # e.g. no catalog images in this dataset
                continue
            ranks, labels, by_image = fold_ranks(
                vectors(asked),
                [r.sku for r in asked],
                vectors(shown),
                [r.sku for r in shown],
                label_of,
            )
            pooled[protocol].add(ranks, labels, by_image)
    return pooled


def cross_validate(
    rows: list[ManifestRow],
    fold_models: Sequence[str] | Mapping[str, Sequence[str]],
    baselines: Sequence[str] = (),
    *,
    seed: int = 0,
    min_images: int = 2,
    max_images: int = 0,
    keep_roles: bool = True,
    catalog_where: str = "domain=iconic",
    catalog_known: bool = False,
) -> CrossValidation:
    """Score ``fold_models`` (one per fold, in fold order; or several such sets by column name)
    and ``baselines`` (every fold) on the held-out products of each fold of ``rows``; ranks
    pooled over the folds. ``catalog_known``: fold models may have trained on the held-out
    products' catalog images, and on nothing else of them (:func:`check_catalog_known`)."""
    trained = dict(fold_models) if isinstance(fold_models, Mapping) else {FOLD_MODELS: fold_models}
    folds = len(next(iter(trained.values()), []))
    if folds < 2 or any(len(models) != folds for models in trained.values()):
        raise ConfigError("cross-validation needs one model per fold (at least 2) in every set")
    catalog = parse_where([catalog_where])
    fold_rows = held_out_folds(rows, folds, seed=seed, min_images=min_images,
                               max_images=max_images, keep_roles=keep_roles)  # fmt: skip
    products = sorted({r.sku for held_out in fold_rows for r in held_out})
    label_of = {p: i for i, p in enumerate(products)}
    columns = [(name, [name] * folds) for name in baselines] + [
        (name, list(models)) for name, models in trained.items()
    ]
    names = [name for name, _ in columns]
    if len(set(names)) < len(names):
        raise ConfigError(f"two columns share a name: {names}")
    results = {
        name: _score_column(models, fold_rows, catalog, label_of, catalog_known)
        for name, models in columns
    }
    return CrossValidation(folds, names, results, next(iter(trained)))
