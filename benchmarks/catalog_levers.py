"""Photo -> catalog image: test-time levers, one change at a time (issue #20).

Every lever is measured on grocery-dev's query photos against (a) the catalog images only
(one per product) and (b) the whole gallery (photos + catalog images), product-level R@1/R@5
and image-level R@1/R@5 (a hit when one of the top K *images* is of the product), with a 95 %
bootstrap interval of R@1 over products.

Models:
- ImageNet Lite2 (no training): scored on the whole 41-product gallery, and on the three
  cross-validation folds (each fold's held-out products only, ranks pooled);
- a NormSoftmax head (LayerNorm -> Linear 512, T 0.05, recipe A's settings) trained per fold
  on cached pooled Lite2 features of the fold's training products only (the cached-feature CPU
  path at the pooled boundary, under a minute per fold), scored like Lite2 on the folds: never
  on a product it trained on; and the same head trained with the training products' augmented
  catalog views as extra training rows (catalog-domain augmentation).

Views are embedded once per (model, view) and cached under ``--cache`` (never in the repo);
a lever averages views' embeddings (then L2-normalises) in numpy.

    python benchmarks/catalog_levers.py ../shared/datasets/grocery-dev/manifest.csv \
        --cache /tmp/snapshop-levers
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from snapshop.data.manifest import ManifestRow
from snapshop.data.readers import read_dataset
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import held_out_folds
from snapshop.evaluate.retrieval import (
    image_ranks,
    product_ranks,
    product_scores,
    recall_interval,
)
from snapshop.evaluate.stats import ratio_interval
from snapshop.images import load_image
from snapshop.models.tta import CatalogAugmentConfig, catalog_views, main_object_crop, mirror

log = logging.getLogger("catalog_levers")

Vectors = NDArray[np.float32]
View = Callable[[Image.Image], list[Image.Image]]


def _unit(x: Vectors) -> Vectors:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def embed_view(
    embedder: object, tag: str, rows: Sequence[ManifestRow], view: str, make: View, cache: Path
) -> Vectors:
    """(N, V, D) embeddings of ``V`` views per image, cached by model tag, view and paths."""
    paths = [str(r.path) for r in rows]
    key = hashlib.sha256(json.dumps([tag, view, paths]).encode()).hexdigest()[:16]
    path = cache / f"{tag}-{view}-{key}.npy"
    if path.exists():
        return np.load(path)
    t = time.perf_counter()
    out = []
    for r in rows:
        out.append(embedder.embed_images(make(load_image(r.path))))  # type: ignore[attr-defined]
    vecs = np.stack(out).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    log.warning("%s %s: %d images in %.0f s", tag, view, len(rows), time.perf_counter() - t)
    return vecs


@dataclass
class Ranked:
    """Pooled ranks (product- and image-level) and the queries' global product labels."""

    product: list[NDArray[np.int64]]
    image: list[NDArray[np.int64]]
    labels: list[NDArray[np.int64]]

    def add(
        self,
        sims: Vectors,
        q_products: Sequence[str],
        g_products: Sequence[str],
        label_of: dict[str, int],
    ) -> None:
        """(Q, G) similarities of the queries to this gallery's images."""
        names = sorted(set(g_products))
        local = {p: i for i, p in enumerate(names)}
        q_lab = np.array([local[p] for p in q_products], np.int64)
        g_lab = np.array([local[p] for p in g_products], np.int64)
        self.product.append(product_ranks(product_scores(sims, g_lab, len(names)), q_lab))
        self.image.append(image_ranks(sims, q_lab, g_lab))
        self.labels.append(np.array([label_of[p] for p in q_products], np.int64))

    def cells(self) -> dict[str, Any]:
        prod, img = np.concatenate(self.product), np.concatenate(self.image)
        labels = np.concatenate(self.labels)
        return {
            "R@1": float((prod < 1).mean()),
            "R@1 ci": recall_interval(prod, labels, 1),
            "R@5": float((prod < 5).mean()),
            "img R@1": float((img < 1).mean()),
            "img R@5": float((img < 5).mean()),
        }


def fit_head(
    feats: Vectors, labels: NDArray[np.int64], epochs: int = 8, seed: int = 0
) -> Callable[[Vectors], Vectors]:
    """NormSoftmax head on cached pooled features (recipe A: LayerNorm -> Linear 512, T 0.05,
    P x K 16 x 4, SGD 0.01 momentum 0.9 wd 1e-4, epoch 0 warm-up, lr x 0.1 after 4 epochs)."""
    import torch

    from snapshop.models.heads import EmbeddingHead
    from snapshop.train.losses import NormSoftmaxLoss
    from snapshop.train.samplers import PKSampler

    torch.manual_seed(seed)
    head = EmbeddingHead(feats.shape[1], 512)
    loss_fn = NormSoftmaxLoss(512, int(labels.max()) + 1)
    params = [*head.parameters(), *loss_fn.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)
    steps = max(1, len(feats) // 64)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = 0.01 * (0.1 if epoch > 4 else 1.0)
        for idx in PKSampler(labels, 16, 4, steps, seed=seed + epoch):
            batch = torch.from_numpy(idx)
            loss = loss_fn(head(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()

    def apply(v: Vectors) -> Vectors:
        with torch.no_grad():
            flat = torch.from_numpy(np.ascontiguousarray(v.reshape(-1, v.shape[-1])))
            out = head(flat).numpy().reshape(*v.shape[:-1], 512)
        return _unit(out)

    return apply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/snapshop-levers"))
    parser.add_argument("--catalog-views", type=int, default=24, help="augmented views")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    from snapshop.models.embedder import load_embedder

    rows = read_dataset(args.dataset)
    queries = [r for r in rows if r.role == "query"]
    photos = [r for r in rows if r.role == "gallery" and r.extra.get("domain") != "iconic"]
    catalog = [r for r in rows if r.role == "gallery" and r.extra.get("domain") == "iconic"]
    lite2 = load_embedder("efficientnet_lite2")
    lite2_300 = load_embedder(export_at(args.cache, 300))
    aug = CatalogAugmentConfig()

    def centre(im: Image.Image) -> list[Image.Image]:
        return [im]

    def flip(im: Image.Image) -> list[Image.Image]:
        return [mirror(im)]

    def framed(im: Image.Image) -> list[Image.Image]:
        return [main_object_crop(im)]

    def augmented(im: Image.Image) -> list[Image.Image]:
        return catalog_views(im, args.catalog_views, random.Random(0), aug)

    c = args.cache
    v = {  # (set, view) -> (N, V, D) ImageNet Lite2 pooled features, L2-normalised
        ("q", "c260"): embed_view(lite2, "lite2", queries, "centre", centre, c),
        ("c", "c260"): embed_view(lite2, "lite2", catalog, "centre", centre, c),
        ("p", "c260"): embed_view(lite2, "lite2", photos, "centre", centre, c),
        ("q", "f260"): embed_view(lite2, "lite2", queries, "flip", flip, c),
        ("c", "f260"): embed_view(lite2, "lite2", catalog, "flip", flip, c),
        ("c", "aug"): embed_view(lite2, "lite2", catalog, f"aug{args.catalog_views}", augmented, c),
        ("q", "frame"): embed_view(lite2, "lite2", queries, "frame", framed, c),
        ("q", "c300"): embed_view(lite2_300, "lite2-300", queries, "centre", centre, c),
        ("c", "c300"): embed_view(lite2_300, "lite2-300", catalog, "centre", centre, c),
        ("p", "c300"): embed_view(lite2_300, "lite2-300", photos, "centre", centre, c),
    }

    def avg(*arrays: Vectors) -> Vectors:
        return _unit(np.concatenate(arrays, axis=1).mean(axis=1))

    # lever -> (query vectors, catalog vectors, gallery-photo vectors); (N, D) or (N, V, D)
    def levers(f: Callable[[Vectors], Vectors]) -> dict[str, tuple[Vectors, Vectors, Vectors]]:
        g = {k: f(x) for k, x in v.items()}
        q, cat, p = g["q", "c260"], g["c", "c260"], g["p", "c260"]
        cat_aug = np.concatenate([cat, g["c", "f260"], g["c", "aug"]], axis=1)
        return {
            "baseline (centre crop, 260 px)": (avg(q), avg(cat), avg(p)),
            "query flip average": (avg(q, g["q", "f260"]), avg(cat), avg(p)),
            "catalog flip average": (avg(q), avg(cat, g["c", "f260"]), avg(p)),
            "query + catalog flip average": (
                avg(q, g["q", "f260"]),
                avg(cat, g["c", "f260"]),
                avg(p),
            ),
            "input 300 px": (avg(g["q", "c300"]), avg(g["c", "c300"]), avg(g["p", "c300"])),
            f"catalog: mean of image + flip + {args.catalog_views} aug views": (
                avg(q),
                avg(cat_aug),
                avg(p),
            ),
            f"catalog: image + flip + {args.catalog_views} aug views, best view": (
                avg(q),
                cat_aug,
                avg(p),
            ),
            # chosen after seeing the rows above: the two levers that helped, together
            f"combined: query flip + catalog mean of {args.catalog_views + 2} views": (
                avg(q, g["q", "f260"]),
                avg(cat_aug),
                avg(p),
            ),
            "query: main-object crop only": (avg(g["q", "frame"]), avg(cat), avg(p)),
            "query: mean of photo + main-object crop": (avg(q, g["q", "frame"]), avg(cat), avg(p)),
        }

    labels = {p: i for i, p in enumerate(sorted({r.sku for r in rows}))}
    q_sku = [r.sku for r in queries]
    c_sku = [r.sku for r in catalog]
    p_sku = [r.sku for r in photos]
    fold_products = [
        {r.sku for r in held}
        for held in held_out_folds(rows, args.folds, seed=0, max_images=0, keep_roles=True)
    ]
    table: dict[str, dict[str, dict[str, Ranked]]] = {}

    def score(
        column: str, lever: str, vecs: tuple[Vectors, Vectors, Vectors], products: set[str]
    ) -> None:
        q, cat, p = vecs
        qi = [i for i, s in enumerate(q_sku) if s in products]
        ci = [i for i, s in enumerate(c_sku) if s in products]
        pi = [i for i, s in enumerate(p_sku) if s in products]
        out = table.setdefault(lever, {}).setdefault(column, {})
        asked = [q_sku[i] for i in qi]
        to_catalog = similarities(q[qi], cat[ci])
        to_photos = similarities(q[qi], p[pi])
        ranked = out.setdefault("catalog", Ranked([], [], []))
        ranked.add(to_catalog, asked, [c_sku[i] for i in ci], labels)
        ranked = out.setdefault("all", Ranked([], [], []))
        g_sku = [c_sku[i] for i in ci] + [p_sku[i] for i in pi]
        ranked.add(np.concatenate([to_catalog, to_photos], axis=1), asked, g_sku, labels)

    def centred(
        vecs: tuple[Vectors, Vectors, Vectors], held: set[str]
    ) -> tuple[Vectors, Vectors, Vectors]:
        train_q = np.array([s not in held for s in q_sku])
        train_p = np.array([s not in held for s in p_sku])
        return centre_domains(*vecs, train_q, train_p)

    def with_centring(
        all_levers: dict[str, tuple[Vectors, Vectors, Vectors]],
    ) -> dict[str, Callable[[set[str]], tuple[Vectors, Vectors, Vectors]]]:
        # added after the rows above had been seen (one look at the folds): optimistic
        plain = next(iter(all_levers))
        views = f"catalog: mean of image + flip + {args.catalog_views} aug views"
        return {
            "domain centring (photo mean of training products, catalog mean)": (
                lambda held: centred(all_levers[plain], held)
            ),
            "domain centring + catalog views": lambda held: centred(all_levers[views], held),
        }

    identity: Callable[[Vectors], Vectors] = lambda x: x  # noqa: E731
    for lever, vecs in levers(identity).items():
        score("ImageNet Lite2, 41-product gallery", lever, vecs, set(labels))
        for held in fold_products:
            score("ImageNet Lite2, 3 folds pooled", lever, vecs, held)
    for lever, make in with_centring(levers(identity)).items():
        for held in fold_products:
            score("ImageNet Lite2, 3 folds pooled", lever, make(held), held)
    heads = {
        "NormSoftmax head (cached features), 3 folds pooled": ("c260",),
        "head + catalog-aug training views, 3 folds pooled": ("c260", "f260", "aug"),
    }
    for column, catalog_train_views in heads.items():
        for held in fold_products:
            train = [r for r in rows if r.sku not in held]
            t = time.perf_counter()
            feats, train_labels = training_set(
                train, v, queries, photos, catalog, catalog_train_views
            )
            head = fit_head(feats, train_labels)
            log.warning("%s: head fitted in %.0f s", column, time.perf_counter() - t)
            head_levers = levers(head)
            for lever, vecs in head_levers.items():
                score(column, lever, vecs, held)
            for lever, make in with_centring(head_levers).items():
                score(column, lever, make(held), held)

    print("python benchmarks/catalog_levers.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(markdown(table))
    if args.json_out:
        args.json_out.write_text(json.dumps(to_json(table), indent=2))
    return 0


def centre_domains(
    queries: Vectors,
    catalog: Vectors,
    photos: Vectors,
    train_queries: NDArray[np.bool_],
    train_photos: NDArray[np.bool_],
) -> tuple[Vectors, Vectors, Vectors]:
    """Domain centring: query and gallery photos minus the mean photo vector of the training
    products (``train_*`` masks: their queries and photos), catalog images minus the mean of
    the whole catalog (the shop's own images, known at indexing time), each re-normalised.
    It needs a fold's training products, so it is scored on the folds only."""
    photo_mean = np.concatenate([queries[train_queries], photos[train_photos]]).mean(axis=0)
    return (
        _unit(queries - photo_mean),
        _unit(catalog - catalog.mean(axis=0)),
        _unit(photos - photo_mean),
    )


def similarities(queries: Vectors, gallery: Vectors) -> Vectors:
    """(Q, G) cosine similarities; a (G, V, D) gallery (V vectors per image) scores each image
    by its best vector."""
    flat = gallery.reshape(-1, gallery.shape[-1])
    sims = queries @ flat.T
    return sims.reshape(len(queries), len(gallery), -1).max(axis=2)


def training_set(
    train: list[ManifestRow],
    v: dict[tuple[str, str], Vectors],
    queries: list[ManifestRow],
    photos: list[ManifestRow],
    catalog: list[ManifestRow],
    catalog_views: Sequence[str] = ("c260",),
) -> tuple[Vectors, NDArray[np.int64]]:
    """Centre-crop features of the training products' photos, with the query photos' flips as
    a second view, and their catalog images' ``catalog_views`` (every view of a catalog image
    counted about 21 times in all, as recipe D repeats the catalog image)."""
    keep = {r.sku for r in train}
    local = {p: i for i, p in enumerate(sorted(keep))}
    feats, labs = [], []
    n_catalog = sum(v["c", view].shape[1] for view in catalog_views)
    for group, rows_, views_, repeat in (
        ("q", queries, ("c260", "f260"), 1),
        ("p", photos, ("c260",), 1),
        ("c", catalog, tuple(catalog_views), max(1, round(21 / n_catalog))),
    ):
        idx = [i for i, r in enumerate(rows_) if r.sku in keep]
        for view in views_:
            for _ in range(repeat):
                for j in range(v[group, view].shape[1]):
                    feats.append(v[group, view][idx, j])
                    labs += [local[rows_[i].sku] for i in idx]
    return np.concatenate(feats).astype(np.float32), np.array(labs, np.int64)


def export_at(cache: Path, size: int) -> Path:
    """ImageNet Lite2 exported at ``size`` px (same weights; the ONNX graph is size-specific)."""
    from snapshop.models.card import read_card, sha256_file, write_card
    from snapshop.models.export import export_onnx, resolve_model_dir
    from snapshop.models.heads import create_embedding_net

    out = cache / f"lite2-{size}"
    if (out / "model.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(create_embedding_net("efficientnet_lite2"), out / "model.onnx", size)
    card = read_card(resolve_model_dir("efficientnet_lite2"))
    write_card(
        out,
        replace(
            card,
            input_size=size,
            name=f"efficientnet_lite2@{size}",
            onnx_sha256=sha256_file(out / "model.onnx"),
        ),
    )
    return out


def markdown(table: dict[str, dict[str, dict[str, Ranked]]]) -> str:
    lines = []
    columns = list(next(iter(table.values())))
    for column in columns:
        lines += [
            "",
            f"{column}",
            "| lever | catalog R@1 [95 % CI] | Δ catalog R@1 vs baseline [95 % CI] | catalog R@5"
            " | catalog img R@5 | all R@1 [95 % CI] | Δ all R@1 [95 % CI] | all R@5"
            " | all img R@5 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = next(iter(table.values()))[column]
        for lever, cols in table.items():
            if column not in cols:  # domain centring: scored on the folds only
                continue
            cat, al = cols[column]["catalog"].cells(), cols[column]["all"].cells()
            d_cat = paired_delta(cols[column]["catalog"], base["catalog"])
            d_all = paired_delta(cols[column]["all"], base["all"])
            lines.append(
                f"| {lever} | {_ci(cat)} | {d_cat} | {cat['R@5']:.3f} | {cat['img R@5']:.3f}"
                f" | {_ci(al)} | {d_all} | {al['R@5']:.3f} | {al['img R@5']:.3f} |"
            )
    return "\n".join(lines)


def _ci(cells: dict[str, object]) -> str:
    lo, hi = cells["R@1 ci"]  # type: ignore[misc]
    return f"{cells['R@1']:.3f} [{lo:.3f}, {hi:.3f}]"


def paired_delta(lever: Ranked, base: Ranked) -> str:
    """R@1 difference with a paired 95 % bootstrap interval over products (the same products
    resampled for both), as '+0.012 [-0.010, +0.031]'."""
    labels = np.concatenate(base.labels)
    hit_l = (np.concatenate(lever.product) < 1).astype(np.float64)
    hit_b = (np.concatenate(base.product) < 1).astype(np.float64)
    products, inverse = np.unique(labels, return_inverse=True)
    diff = np.bincount(inverse, weights=hit_l - hit_b, minlength=len(products))
    counts = np.bincount(inverse, minlength=len(products)).astype(np.float64)
    lo, hi = ratio_interval(diff, counts)
    return f"{diff.sum() / counts.sum():+.3f} [{lo:+.3f}, {hi:+.3f}]"


def to_json(table: dict) -> dict:  # type: ignore[type-arg]
    return {
        lever: {col: {prot: r.cells() for prot, r in prots.items()} for col, prots in cols.items()}
        for lever, cols in table.items()
    }


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SnapshopError as exc:
        sys.exit(f"error: {exc}")
