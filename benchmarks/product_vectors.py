"""Ranking products by product vectors vs by their best image (photo -> products).

Embeds a manifest's query photos and gallery images once (cached in ``--cache``), then ranks
the gallery's products for every query two ways: by the best-scoring gallery image of each
product (``snapshop search --ranking image``) and by the product vector (the mean of the
product's normalised gallery image vectors, ``snapshop.product_vectors.mean_pool``; the
default ranking of ``snapshop search``). Prints R@K with a 95 % bootstrap interval over
products, first computed in numpy, then again through the search path itself (a catalog
holding the gallery's vectors, ``Searcher.rank_products`` with its default ranking and with
``ranking="image"``), and the search time per query of each way (exact index; image way =
``search.top_products`` over the image index, product way = one top-k over the product
index), at the dataset's size and at ``--scale`` synthetic products.

    python benchmarks/product_vectors.py ../shared/datasets/grocery-dev/manifest.csv \
        --cache /tmp/grocery-lite2.npz
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.catalog import create_catalog
from snapshop.data.manifest import read_manifest
from snapshop.evaluate.retrieval import embed_paths, product_ranks, product_scores, recall_interval
from snapshop.evaluate.stats import ratio_interval
from snapshop.index.flat import FlatIndex
from snapshop.models.embedder import load_embedder
from snapshop.product_vectors import mean_pool
from snapshop.search import DEFAULT_RANKING, Searcher, top_products

KS = (1, 5, 10)
PER_PRODUCT = (1, 2, 3, 5, 10)  # gallery images kept per product in the subsampled runs


def embeddings(manifest: Path, model: str, cache: Path | None) -> dict[str, NDArray]:
    if cache is not None and cache.exists():
        with np.load(cache) as data:
            return dict(data)
    rows = read_manifest(manifest)
    embedder = load_embedder(model)
    out: dict[str, NDArray] = {}
    for role in ("query", "gallery"):
        chosen = [r for r in rows if r.role == role]
        vecs, kept, _, ms = embed_paths(embedder, [str(r.path) for r in chosen])
        out[f"{role}_vecs"] = vecs
        out[f"{role}_products"] = np.array([chosen[i].sku for i in kept])
        print(f"embedded {len(kept)} {role} images ({ms:.1f} ms/image)")
    if cache is not None:
        np.savez(cache, **out)
    return out


def recall_table(name: str, ranks: NDArray[np.int64], labels: NDArray[np.int64]) -> str:
    cells = []
    for k in KS:
        lo, hi = recall_interval(ranks, labels, k)
        cells.append(f"{(ranks < k).mean():.3f} ({lo:.3f}–{hi:.3f})")
    return f"| {name} | " + " | ".join(cells) + " |"


def both_ranks(
    q_vecs: NDArray[np.float32],
    q_labels: NDArray[np.int64],
    g_vecs: NDArray[np.float32],
    g_labels: NDArray[np.int64],
    n_products: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Ranks of each query's product: by best image, and by product vector."""
    by_image = product_ranks(product_scores(q_vecs @ g_vecs.T, g_labels, n_products), q_labels)
    pooled_ids, pooled = mean_pool(g_labels, g_vecs)
    assert np.array_equal(pooled_ids, np.arange(n_products))
    return by_image, product_ranks(q_vecs @ pooled.T, q_labels)


def paired_difference(
    first: NDArray[np.int64], second: NDArray[np.int64], labels: NDArray[np.int64], k: int
) -> tuple[float, float, float]:
    """R@k(second) - R@k(first) with a 95 % bootstrap interval over products (paired: the
    same resampled products for both)."""
    products, inverse = np.unique(labels, return_inverse=True)
    gain = (second < k).astype(np.float64) - (first < k).astype(np.float64)
    per_product = np.bincount(inverse, weights=gain, minlength=len(products))
    counts = np.bincount(inverse, minlength=len(products))
    lo, hi = ratio_interval(per_product, counts)
    return float(gain.mean()), lo, hi


def subsampled(
    q_vecs: NDArray[np.float32],
    q_labels: NDArray[np.int64],
    g_vecs: NDArray[np.float32],
    g_labels: NDArray[np.int64],
    n_products: int,
    seeds: int = 5,
) -> None:
    """The same comparison with only m gallery images per product (a shop lists a few)."""
    print(
        "\n| gallery images per product | R@1 best image | R@1 product vector |"
        " R@1 gain (95% CI) | R@5 best image | R@5 product vector |"
    )
    print("|---|---|---|---|---|---|")
    for m in PER_PRODUCT:
        rows = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            keep = np.concatenate(
                [rng.permutation(np.flatnonzero(g_labels == p))[:m] for p in range(n_products)]
            )
            by_image, by_product = both_ranks(
                q_vecs, q_labels, g_vecs[keep], g_labels[keep], n_products
            )
            gain = paired_difference(by_image, by_product, q_labels, 1)
            rows.append(
                (
                    (by_image < 1).mean(),
                    (by_product < 1).mean(),
                    *gain,
                    (by_image < 5).mean(),
                    (by_product < 5).mean(),
                )
            )
        a = np.mean(rows, axis=0)
        print(
            f"| {m} (mean of {seeds} draws) | {a[0]:.3f} | {a[1]:.3f} |"
            f" {a[2]:+.3f} ({a[3]:+.3f}…{a[4]:+.3f}) | {a[5]:.3f} | {a[6]:.3f} |"
        )


def time_searches(
    image_vecs: NDArray[np.float32],
    image_owner: NDArray[np.int64],
    queries: NDArray[np.float32],
    k: int,
) -> tuple[float, float]:
    """ms/query: best image per product (top_products) vs one search of the product index."""
    image_index = FlatIndex(image_vecs.shape[1])
    image_index.add(np.arange(len(image_vecs), dtype=np.int64), image_vecs)
    owner = dict(enumerate(image_owner.tolist()))

    def owner_of(ids: list[int]) -> dict[int, int]:
        return {i: owner[i] for i in ids}

    products, pooled = mean_pool(image_owner, image_vecs)
    product_index = FlatIndex(pooled.shape[1])
    product_index.add(products, pooled)
    search_image = functools.partial(top_products, image_index, k=k, owner_of=owner_of)
    timings = []
    for run in (lambda q: search_image(q), lambda q: product_index.search(q[None, :], k)):
        for q in queries[:20]:  # warm-up
            run(q)
        t = time.perf_counter()
        for q in queries:
            run(q)
        timings.append(1e3 * (time.perf_counter() - t) / len(queries))
    return timings[0], timings[1]


def searcher_ranks(
    q_vecs: NDArray[np.float32],
    g_vecs: NDArray[np.float32],
    g_labels: NDArray[np.int64],
    q_labels: NDArray[np.int64],
    model: str,
    k: int = 10,
) -> dict[str, NDArray[np.int64]]:
    """{ranking: rank of each query's product (k when not in the top k)} through
    ``Searcher.rank_products`` (what ``Searcher.search`` calls for its image-based results)
    over a catalog holding the gallery vectors; the queries are their cached vectors."""
    embedder = load_embedder(model)  # for its model id: nothing is embedded here
    out: dict[str, NDArray[np.int64]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        catalog = create_catalog(Path(tmp) / "cat", model_id=embedder.model_id,
                                 model_ref=model, dim=g_vecs.shape[1])  # fmt: skip
        with catalog:
            catalog_id: dict[int, int] = {}
            with catalog.writing() as write:
                for n, (vec, label) in enumerate(zip(g_vecs, g_labels.tolist(), strict=True)):
                    if label not in catalog_id:
                        catalog_id[label] = write.upsert_product(f"product-{label}")
                    write.insert_image(
                        catalog_id[label], source=f"{n}.jpg", blob=None, sha256=f"{n:064x}",
                        width=1, height=1, vector=vec,
                    )  # fmt: skip
            searcher = Searcher(catalog, embedder)
            for ranking in (searcher.ranking, "image"):
                ranks = np.full(len(q_vecs), k, np.int64)
                for row, (q, label) in enumerate(zip(q_vecs, q_labels.tolist(), strict=True)):
                    hits = searcher.rank_products(q, k, ranking=ranking)
                    found = [h.product_id for h in hits]
                    if catalog_id[label] in found:
                        ranks[row] = found.index(catalog_id[label])
                out[ranking] = ranks
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--model", default="efficientnet_lite2")
    parser.add_argument("--cache", type=Path, default=None, help="Embedding cache (.npz).")
    parser.add_argument("--scale", type=int, default=20_000, help="Synthetic products (timing).")
    parser.add_argument("--images-per-product", type=int, default=5)
    args = parser.parse_args()

    data = embeddings(args.manifest, args.model, args.cache)
    products = sorted(set(data["gallery_products"].tolist()))
    pid = {p: i for i, p in enumerate(products)}
    keep = np.array([p in pid for p in data["query_products"].tolist()])
    q_vecs = data["query_vecs"][keep]
    q_labels = np.array([pid[p] for p in data["query_products"][keep].tolist()], np.int64)
    g_vecs = data["gallery_vecs"]
    g_labels = np.array([pid[p] for p in data["gallery_products"].tolist()], np.int64)

    by_image, by_product = both_ranks(q_vecs, q_labels, g_vecs, g_labels, len(products))

    print(
        f"\n{args.manifest}: {len(q_vecs)} query photos, {len(g_vecs)} gallery images,"
        f" {len(products)} products, model {args.model}\n"
    )
    print("| ranking | " + " | ".join(f"R@{k} (95% CI)" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    print(recall_table("best image per product (search today)", by_image, q_labels))
    print(recall_table("product vector (mean of images)", by_product, q_labels))
    changed = (by_image == 0) != (by_product == 0)
    print(
        f"\nqueries whose top-1 correctness differs: {int(changed.sum())} of {len(q_labels)}"
        f" (image-only right {int(((by_image == 0) & (by_product != 0)).sum())},"
        f" product-only right {int(((by_product == 0) & (by_image != 0)).sum())})"
    )
    for k in (1, 5):
        gain, lo, hi = paired_difference(by_image, by_product, q_labels, k)
        ci = f"{lo:+.3f}…{hi:+.3f}"
        print(f"R@{k} gain of product vectors: {gain:+.3f} (95% CI over products {ci})")
    through = searcher_ranks(q_vecs, g_vecs, g_labels, q_labels, args.model)
    print("\nThrough the search path (Searcher.rank_products, k = 10):\n")
    print("| ranking | " + " | ".join(f"R@{k} (95% CI)" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    for ranking, numpy_ranks in ((DEFAULT_RANKING, by_product), ("image", by_image)):
        label = f"`{ranking}`" + (" (default)" if ranking == DEFAULT_RANKING else "")
        print(recall_table(label, through[ranking], q_labels))
        differ = int((through[ranking] != np.minimum(numpy_ranks, 10)).sum())
        print(f"<!-- {ranking}: {differ} of {len(q_labels)} ranks differ from numpy -->")
    gain, lo, hi = paired_difference(through["image"], through[DEFAULT_RANKING], q_labels, 1)
    print(f"R@1 gain of the default over ranking='image': {gain:+.3f} ({lo:+.3f}…{hi:+.3f})")
    subsampled(q_vecs, q_labels, g_vecs, g_labels, len(products))

    print("\n| gallery | images | products | best image ms/query | product vector ms/query |")
    print("|---|---|---|---|---|")
    img_ms, prod_ms = time_searches(g_vecs, g_labels, q_vecs, 10)
    print(
        f"| {args.manifest.parent.name} | {len(g_vecs)} | {len(products)} | {img_ms:.3f} |"
        f" {prod_ms:.3f} |"
    )
    rng = np.random.default_rng(0)
    dim = g_vecs.shape[1]
    centres = rng.normal(size=(args.scale, dim)).astype(np.float32)
    owner = np.repeat(np.arange(args.scale), args.images_per_product)
    synth = centres[owner] + 0.5 * rng.normal(size=(len(owner), dim)).astype(np.float32)
    synth /= np.linalg.norm(synth, axis=1, keepdims=True)
    queries = synth[rng.choice(len(synth), 200, replace=False)]
    img_ms, prod_ms = time_searches(synth, owner.astype(np.int64), queries, 10)
    print(f"| synthetic | {len(synth)} | {args.scale} | {img_ms:.3f} | {prod_ms:.3f} |")


if __name__ == "__main__":
    main()
