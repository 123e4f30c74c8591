"""Recall@K and mAP@R against hand-computed values and brute-force references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from script_helpers import load_script

from snapshop.errors import ConfigError
from snapshop.evaluate.retrieval import (
    evaluate_embeddings,
    image_ranks,
    map_at_r,
    product_scores,
    recall_at_k,
)


def test_recall_at_k_hand_computed_with_ties() -> None:
    sims = np.array(
        [
            [0.9, 0.5, 0.1],  # label 0: rank 0
            [0.8, 0.8, 0.1],  # label 1: tied with product 0 -> counted behind it, rank 1
            [0.3, 0.2, 0.1],  # label 2: rank 2
            [0.4, 0.4, 0.4],  # label 0: three-way tie -> rank 2
        ],
        dtype=np.float32,
    )
    labels = np.array([0, 1, 2, 0])
    assert recall_at_k(sims, labels, [1, 2, 3]) == {1: 0.25, 2: 0.5, 3: 1.0}


def test_recall_at_k_larger_than_products() -> None:
    sims = np.array([[0.1, 0.9]], dtype=np.float32)
    assert recall_at_k(sims, np.array([0]), [1, 100]) == {1: 0.0, 100: 1.0}


def test_product_scores_is_max_over_each_products_images() -> None:
    sims = np.array([[0.1, 0.7, 0.3, 0.2], [0.5, 0.4, 0.9, 0.0]], dtype=np.float32)
    labels = np.array([0, 0, 2, 2])  # product 1 has no gallery image
    out = product_scores(sims, labels, 3)
    assert out[0].tolist() == pytest.approx([0.7, -np.inf, 0.3])
    assert out[1].tolist() == pytest.approx([0.5, -np.inf, 0.9])


def test_product_level_recall_one_product_many_images() -> None:
    """Five near-duplicates of a wrong product rank as ONE product, not five."""
    sims = np.array([[0.95, 0.94, 0.93, 0.92, 0.91, 0.90]], dtype=np.float32)
    gallery = np.array([1, 1, 1, 1, 1, 0])
    per_product = product_scores(sims, gallery, 2)
    assert recall_at_k(per_product, np.array([0]), [1, 2]) == {1: 0.0, 2: 1.0}


def test_map_at_r_hand_computed() -> None:
    gallery = np.array([0, 0, 1, 1, 1])
    sims = np.array(
        [
            [0.9, 0.1, 0.8, 0.2, 0.3],  # label 0, R=2: top2 = [rel, irr] -> (1/1) / 2 = 0.5
            [0.9, 0.8, 0.7, 0.6, 0.5],  # label 1, R=3: top3 = [irr, irr, rel] -> (1/3) / 3
            [0.9, 0.8, 0.1, 0.1, 0.1],  # label 2: no gallery image -> left out
            [0.1, 0.2, 0.9, 0.8, 0.7],  # label 1, R=3: all relevant first -> 1.0
        ],
        dtype=np.float32,
    )
    labels = np.array([0, 1, 2, 1])
    expected = (0.5 + 1 / 9 + 1.0) / 3
    assert map_at_r(sims, labels, gallery) == pytest.approx(expected)


def test_map_at_r_ties_count_against_the_query() -> None:
    sims = np.array([[0.5, 0.5]], dtype=np.float32)
    # The relevant image ties with an irrelevant one: same answer whichever comes first.
    assert map_at_r(sims, np.array([0]), np.array([0, 1])) == 0.0
    assert map_at_r(sims, np.array([0]), np.array([1, 0])) == 0.0


def test_map_at_r_only_lone_queries() -> None:
    sims = np.array([[0.5, 0.2]], dtype=np.float32)
    assert map_at_r(sims, np.array([3]), np.array([0, 1])) == 0.0


def test_map_at_r_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(20, 30)).astype(np.float32)
    gallery = rng.integers(0, 5, 30)
    labels = rng.integers(0, 6, 20)  # label 5 never in the gallery
    values = []
    for q in range(20):
        ranked = sorted(range(30), key=lambda g: -sims[q, g])
        r = int((gallery == labels[q]).sum())
        if r == 0:
            continue
        hits, total = 0, 0.0
        for i, g in enumerate(ranked[:r], 1):
            if gallery[g] == labels[q]:
                hits += 1
                total += hits / i
        values.append(total / r)
    assert map_at_r(sims, labels, gallery) == pytest.approx(float(np.mean(values)))


def unit(rows: list[list[float]]) -> np.ndarray:
    arr = np.array(rows, dtype=np.float32)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)


def test_evaluate_embeddings_end_to_end() -> None:
    gallery = unit([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    gallery_products = ["a", "a", "b", "c"]
    queries = unit([[1, 0.05, 0], [0.1, 0, 1], [0.7, 0.71, 0], [0, 0.2, 1]])
    query_products = ["a", "b", "lone", "c"]  # "lone" has no gallery image: dropped
    report = evaluate_embeddings(
        "toy", queries, query_products, gallery, gallery_products, ks=(1, 2, 3)
    )
    assert report.n_queries == 3 and report.n_gallery == 4 and report.n_products == 3
    # a -> a first (hit@1); b -> c, a, b (hit@3); c -> c (hit@1)
    assert report.recall == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert report.search_ms_per_query >= 0
    data = report.to_dict()
    assert data["recall"]["R@1"] == round(2 / 3, 4)
    assert data["queries"] == 3
    # image level: b's own image comes after c, a, a (rank 3), so it misses at K = 3
    assert report.image_recall == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 3: 2 / 3}
    assert data["image_recall"]["R@3"] == round(2 / 3, 4)


def brute_force_image_recall(
    queries: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray, k: int
) -> float:
    """Literal definition: sort the gallery images by similarity, look at the top K labels."""
    hits = 0
    for q, label in zip(queries, q_labels, strict=True):
        order = sorted(range(len(gallery)), key=lambda g: -float(gallery[g] @ q))
        hits += any(g_labels[g] == label for g in order[:k])
    return hits / len(queries)


def test_image_level_recall_matches_brute_force_on_generated_vectors() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 16))
    g_labels = rng.integers(0, 6, 40)
    q_labels = rng.integers(0, 7, 25)  # label 6 never in the gallery: never a hit
    gallery = centres[g_labels] + rng.normal(scale=1.5, size=(40, 16))
    queries = np.where(q_labels[:, None] < 6, centres[np.minimum(q_labels, 5)], 0)
    queries = queries + rng.normal(scale=1.5, size=(25, 16))
    sims = (queries @ gallery.T).astype(np.float32)
    ranks = image_ranks(sims, q_labels, g_labels)
    assert (ranks[q_labels == 6] == 40).all()
    for k in (1, 2, 3, 5, 10, 40):
        expected = brute_force_image_recall(queries, q_labels, gallery, g_labels, k)
        assert float((ranks < k).mean()) == pytest.approx(expected)
    assert 0 < float((ranks < 3).mean()) < 1  # the data is neither trivial nor hopeless


def test_image_level_recall_is_below_product_level_with_duplicate_images() -> None:
    """Two images of one wrong product fill the top 2 images but only one product slot."""
    sims = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    g_labels, q_labels = np.array([1, 1, 0]), np.array([0])
    assert image_ranks(sims, q_labels, g_labels).tolist() == [2]
    assert recall_at_k(product_scores(sims, g_labels, 2), q_labels, [2]) == {2: 1.0}


def test_image_ranks_ties_count_against_the_query() -> None:
    sims = np.array([[0.5, 0.5, 0.5, 0.1]], dtype=np.float32)
    # the query's best image ties with two others: both counted ahead of it
    assert image_ranks(sims, np.array([0]), np.array([1, 0, 2, 0])).tolist() == [2]


def test_evaluate_embeddings_needs_overlap() -> None:
    g = unit([[1, 0]])
    with pytest.raises(ConfigError):
        evaluate_embeddings("x", unit([[0, 1]]), ["q"], g, ["g"])
    with pytest.raises(ConfigError):
        evaluate_embeddings("x", np.zeros((0, 2), np.float32), [], g, ["g"])


def test_recall_interval_resamples_products_not_queries() -> None:
    from snapshop.evaluate.retrieval import recall_interval

    # 4 products x 10 queries: products 0 and 1 always hit, 2 and 3 always miss -> R@1 = 0.5
    labels = np.repeat(np.arange(4), 10)
    ranks = np.where(labels < 2, 0, 3)
    lo, hi = recall_interval(ranks, labels, k=1)
    assert lo <= 0.5 <= hi
    assert hi - lo >= 0.5  # 4 clusters: wide; resampling the 40 queries would give about 0.3
    assert (lo, hi) == recall_interval(ranks, labels, k=1)  # seeded
    assert recall_interval(ranks, labels, k=4) == (1.0, 1.0)  # every query within 4
    # the same hit rate spread inside every product: resampling products changes nothing
    mixed = np.tile([0, 3], 20)
    assert recall_interval(mixed, labels, k=1) == (0.5, 0.5)
    with pytest.raises(ConfigError):
        recall_interval(ranks, labels, k=1, level=1.0)


def test_cross_validated_ranks_match_brute_force_and_pool_over_folds() -> None:
    from snapshop.evaluate import crossval as cv

    rng = np.random.default_rng(0)
    label_of = {f"p{i}": i for i in range(6)}
    pooled = cv.PooledRanks()
    expected_hits, expected_image_hits_at_2, total = 0, 0, 0
    for fold_products in (["p0", "p2", "p4"], ["p1", "p3", "p5"]):
        gallery_products = [p for p in fold_products for _ in range(3)]
        query_products = [p for p in fold_products for _ in range(4)]
        g = rng.normal(size=(len(gallery_products), 8)).astype(np.float32)
        q = rng.normal(size=(len(query_products), 8)).astype(np.float32)
        ranks, labels, by_image = cv.fold_ranks(q, query_products, g, gallery_products, label_of)
        for i, product in enumerate(query_products):  # brute force: best image per product
            scores = [float(q[i] @ g[j]) for j in range(len(gallery_products))]
            best = {
                p: max(s for s, gp in zip(scores, gallery_products, strict=True) if gp == p)
                for p in fold_products
            }
            assert ranks[i] == sum(v >= best[product] for v in best.values()) - 1
            assert labels[i] == label_of[product]
            # image level: other products' images scoring at least the product's best image
            others = [s for s, gp in zip(scores, gallery_products, strict=True) if gp != product]
            assert by_image[i] == sum(s >= best[product] for s in others)
            assert by_image[i] >= ranks[i]  # never a better rank than the product's
            expected_hits += ranks[i] == 0
            expected_image_hits_at_2 += by_image[i] < 2
            total += 1
        pooled.add(ranks, labels, by_image)
    value, (lo, hi) = pooled.recall(1)
    assert value == pytest.approx(expected_hits / total) and lo <= value <= hi
    assert pooled.image_recall(1)[0] == value  # at K = 1 both levels agree
    assert pooled.image_recall(2)[0] == pytest.approx(expected_image_hits_at_2 / total)
    assert pooled.image_recall(2)[0] <= pooled.recall(2)[0]
    without = cv.PooledRanks()
    without.add(ranks, labels)
    assert not without.has_image_ranks
    with pytest.raises(ConfigError, match="image-level"):
        without.image_recall(5)
    assert pooled.queries == total and len(pooled.per_fold_r1) == 2
    with pytest.raises(ValueError, match="without a gallery image"):
        cv.fold_ranks(q[:1], ["p9"], g, gallery_products, {"p9": 9})


def test_paired_difference_between_columns_matches_brute_force() -> None:
    from snapshop.evaluate import crossval as cv

    labels = np.repeat(np.arange(8), 5)  # 8 products, 5 queries each, in one fold
    rng = np.random.default_rng(3)
    base_ranks = rng.integers(0, 3, len(labels))
    better_ranks = np.where(labels < 4, 0, base_ranks)  # products 0-3 always found first
    results = {}
    for name, ranks in (("base", base_ranks), ("better", better_ranks)):
        pooled = cv.PooledRanks()
        pooled.add(ranks[:20], labels[:20])  # two folds
        pooled.add(ranks[20:], labels[20:])
        results[name] = {"photo -> all": pooled, "photo -> catalog": cv.PooledRanks()}
    result = cv.CrossValidation(2, ["base", "better"], results, reference="base")
    delta, lo, hi = result.paired_difference("base", "better", "photo -> all")
    assert delta == pytest.approx((better_ranks < 1).mean() - (base_ranks < 1).mean())
    assert 0 <= lo <= delta <= hi  # never worse on any product: no draw below zero
    assert result.paired_difference("base", "base", "photo -> all") == (0.0, 0.0, 0.0)
    row = next(line for line in result.markdown() if line.startswith("| R@1 - base, paired"))
    assert row.split(" | ")[1:] == ["-", f"{delta:+.4f} [{lo:+.3f}, {hi:+.3f}] |"]
    shorter = cv.PooledRanks()
    shorter.add(better_ranks[:-1], labels[:-1])  # one query fewer: not the same queries
    results["shorter"] = {"photo -> all": shorter}
    with pytest.raises(ConfigError, match="not scored on the same queries"):
        result.paired_difference("base", "shorter", "photo -> all")


def test_cross_validation_script_scores_every_product_once(tmp_path, lite0_model_dir) -> None:
    import csv
    import json

    from PIL import Image

    cv = load_script("benchmarks/grocery_cv.py")  # the script: a shell over evaluate.crossval
    rng = np.random.default_rng(1)
    rows = []
    for p in range(6):
        colour = rng.integers(0, 255, 3)
        for i in range(4):
            pixels = np.clip(colour + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
            name = f"p{p}_{i}.png"
            Image.fromarray(pixels).save(tmp_path / name)
            rows.append(
                {
                    "path": name,
                    "product_id": f"p{p}",
                    "role": "query" if i < 2 else "gallery",
                    "domain": "iconic" if i == 3 else "natural",
                }
            )
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from snapshop.data.readers import read_dataset
    from snapshop.evaluate.crossval import cross_validate, held_out_folds

    model = str(lite0_model_dir)
    rows = read_dataset(tmp_path / "m.csv")
    folds = held_out_folds(rows, 3)
    held_out = [r.sku for fold in folds for r in fold]
    assert sorted(set(held_out)) == [f"p{p}" for p in range(6)]  # every product once ...
    assert len(held_out) == len(rows)  # ... with all its images
    result = cross_validate(rows, [model] * 3)
    report = result.to_dict()["trained (fold models)"]
    assert set(report) == {"photo -> all", "photo -> catalog"}
    for protocol in report.values():
        assert len(protocol["per_fold_R@1"]) == 3
        assert 0.0 <= protocol["R@1"]["value"] <= protocol["R@5"]["value"] == 1.0  # <= 2 products
        # image level: 2 products x 2 gallery images (1 catalog image) per fold, so the top 2
        # images may miss the product where the top 2 products cannot
        assert protocol["image R@2"]["value"] <= protocol["R@2"]["value"]
        assert protocol["image R@5"]["value"] == 1.0
    assert any(line.startswith("| image R@5 |") for line in result.markdown())
    pooled = result.results["trained (fold models)"]["photo -> all"]
    assert pooled.queries == 12 and pooled.products == 6  # 2 query photos of each product
    no_catalog = cross_validate(rows, [model] * 3, catalog_where="domain=none")
    assert set(no_catalog.to_dict()["trained (fold models)"]) == {"photo -> all"}
    assert any("skipped" in line for line in no_catalog.markdown())
    with pytest.raises(ConfigError, match="at least 2"):
        cross_validate(rows, [model])
    with pytest.raises(ConfigError, match="in every set"):  # sets of different fold counts
        cross_validate(rows, {"a": [model] * 3, "b": [model] * 2})
    with pytest.raises(ConfigError, match="share a name"):  # a baseline named as a set
        cross_validate(rows, {model: [model] * 3}, [model])

    # The script is a shell over the library: the same numbers, as JSON.
    out = tmp_path / "cv.json"
    assert (
        cv.main(
            [str(tmp_path / "m.csv"), "--fold-models", model, model, model, "--json-out", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result.to_dict()))

    # Two recipes: a column each, named by their directories, and the paired difference to the
    # first (the same model under another name: zero, with a zero-width interval).
    (tmp_path / "again").symlink_to(model)
    again = str(tmp_path / "again")
    argv = [str(tmp_path / "m.csv"), "--fold-models", model, model, model]
    assert cv.main([*argv, "--fold-models", again, again, again, "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    first = "/".join([lite0_model_dir.name] * 3)
    assert set(report) == {first, "again/again/again"}
    assert report["again/again/again"]["photo -> all"][f"R@1 - {first}"] == {
        "value": 0.0,
        "ci95": [0.0, 0.0],
    }
    with pytest.raises(SystemExit):  # two sets the table could not tell apart
        cv.main([*argv, "--fold-models", model, model, model])


def test_ratio_interval_units_and_edges() -> None:
    import numpy as np

    from snapshop.evaluate.stats import ratio_interval

    assert ratio_interval([3, 2], [3, 2]) == (1.0, 1.0)
    lo, hi = ratio_interval(np.r_[np.ones(50), np.zeros(50)], np.ones(100))
    assert 0.38 < lo < 0.5 < hi < 0.62
    # one unit holding every hit: resampling units (not hits) gives a wide interval
    lo, hi = ratio_interval([10, 0, 0, 0], [10, 10, 10, 10])
    assert lo == 0.0 and hi >= 0.5
    assert ratio_interval([0, 0], [0, 0]) != ratio_interval([0, 0], [0, 0])  # (nan, nan)
    assert np.isnan(ratio_interval([], [])[0])
    with pytest.raises(ConfigError):
        ratio_interval([1, 2], [1])
    with pytest.raises(ConfigError):
        ratio_interval([1], [1], level=0.0)


def test_ratio_interval_in_chunks_is_the_same_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from snapshop.evaluate import stats

    hits = np.random.default_rng(1).integers(0, 2, 300).astype(np.float64)
    whole = stats.ratio_interval(hits, np.ones(300))
    monkeypatch.setattr(stats, "MAX_DRAWN", 1000)  # 3 resamples per chunk
    assert stats.ratio_interval(hits, np.ones(300)) == whole


def test_catalog_known_allows_held_out_catalog_images_in_training_and_nothing_else(
    tmp_path: Path,
) -> None:
    import csv

    from snapshop.data.manifest import read_manifest
    from snapshop.evaluate.crossval import check_catalog_known

    def write(name: str, extra: list[dict[str, str]]) -> Path:
        rows = [
            {"path": f"p{p}_{i}.jpg", "product_id": f"p{p}", "role": role, "domain": domain}
            | {"split": split}
            for p, split in ((0, "train"), (1, "train"), (2, "test"), (3, "test"))
            for i, (role, domain) in enumerate(
                (("query", "natural"), ("gallery", "natural"), ("gallery", "iconic"))
            )
        ]
        path = tmp_path / name
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows + extra)
        return path

    held_out = [r for r in read_manifest(write("base.csv", [])) if r.extra["split"] == "test"]
    catalog = {"domain": "iconic"}
    known = [
        {"path": f"p{p}_2.jpg", "product_id": f"p{p}", "role": "gallery", "domain": "iconic"}
        | {"split": "train"}
        for p in (2, 3)
    ]
    check_catalog_known("m", {"data": str(write("known.csv", known))}, held_out, catalog)
    photo = {"path": "p2_0.jpg", "product_id": "p2", "role": "query", "domain": "natural"}
    photo["split"] = "train"
    leaked = write("leaked.csv", [*known, photo])
    with pytest.raises(ConfigError, match="1 images of held-out products that are not catalog"):
        check_catalog_known("m", {"data": str(leaked)}, held_out, catalog)
    with pytest.raises(ConfigError, match="no held-out catalog image"):
        check_catalog_known("m", {"data": str(tmp_path / "base.csv")}, held_out, catalog)
    with pytest.raises(ConfigError, match="is not here to check"):
        check_catalog_known("m", {"data": str(tmp_path / "gone.csv")}, held_out, catalog)
    with pytest.raises(ConfigError, match="is not here to check"):
        check_catalog_known("m", {}, held_out, catalog)
