"""Edges of the data that training and evaluation read, and of the numbers they report: NaN
scores and diverged training, a query that is also a gallery image, held-out protocols with no
answerable query, CSVs with a byte-order mark, bootstrap seeds, and brute-force references."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from catalog_helpers import MeanColourEmbedder, make_images
from PIL import Image

from snapshop.data.manifest import ManifestRow, write_manifest
from snapshop.errors import ConfigError, ManifestError, ModelError
from snapshop.evaluate import retrieval
from snapshop.evaluate.crossval import fold_ranks, held_out_folds
from snapshop.evaluate.retrieval import (
    evaluate_embeddings,
    image_ranks,
    map_at_r,
    product_ranks,
    product_scores,
)
from snapshop.evaluate.stats import paired_ratio_difference, ratio_interval


# --- NaN scores: a broken model must not score as a perfect one -------------------------------
def test_nan_scores_rank_as_misses_never_as_hits() -> None:
    from snapshop.train.trainer import score_retrieval

    gallery = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]
    products = ["a", "a", "b", "c"]
    nan_queries = np.full((3, 3), np.nan, np.float32)
    recall, map_r = score_retrieval(nan_queries, ["a", "b", "c"], gallery, products, ks=(1, 3))
    assert recall == {1: 0.0, 3: 0.0} and map_r == 0.0

    ranks, _, by_image = fold_ranks(
        nan_queries, ["a", "b", "c"], gallery, products, {"a": 0, "b": 1, "c": 2}
    )
    assert ranks.tolist() == [3, 3, 3] and by_image.tolist() == [4, 4, 4]

    # one NaN competitor ranks ahead of the query's own product, image and relevant images
    sims = np.array([[0.9, np.nan, 0.1]], np.float32)
    labels = np.array([0, 1, 2])
    assert product_ranks(product_scores(sims, labels, 3), np.array([0])).tolist() == [1]
    assert image_ranks(sims, np.array([0]), labels).tolist() == [1]
    assert map_at_r(sims, np.array([0]), np.array([1, 0, 0])) == 0.25  # R=2: NaN last, 0.1 2nd
    assert map_at_r(np.array([[np.nan, 0.5]], np.float32), np.array([0]), np.array([1, 0])) == 0.0


def test_evaluate_embeddings_refuses_vectors_that_are_not_finite() -> None:
    gallery = np.eye(2, dtype=np.float32)
    with pytest.raises(ConfigError, match="NaN or infinity"):
        evaluate_embeddings("x", np.full((1, 2), np.nan, np.float32), ["a"], gallery, ["a", "b"])


class _NanEmbedder:
    dim = 3
    card = SimpleNamespace(name="nan")

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return np.full((len(images), 3), np.nan, np.float32)


def test_a_model_that_embeds_nan_is_named_not_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = make_images(tmp_path / "shop", n_products=2, per_product=2, size=32)
    rows = [
        ManifestRow(p, sku, "gallery" if j else "query")
        for sku, paths in images.items()
        for j, p in enumerate(paths)
    ]
    monkeypatch.setattr("snapshop.models.embedder.load_embedder", lambda model: _NanEmbedder())
    with pytest.raises(ModelError, match="embeds it as NaN or infinity .2 of 2 images"):
        retrieval.evaluate_manifest(rows, ks=(1,))


# --- a query that is also a gallery image finds itself ----------------------------------------


def test_a_query_listed_in_the_gallery_too_is_refused_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshop.train.trainer import NormSoftmaxTrainer, TrainConfig

    images = make_images(tmp_path / "shop", n_products=3, per_product=2, size=32)
    both = [
        ManifestRow(p, sku, role, {"domain": "x"})
        for sku, paths in images.items()
        for p in paths
        for role in ("query", "gallery")
    ]
    write_manifest(tmp_path / "m.csv", both, tmp_path)
    monkeypatch.setattr(
        "snapshop.models.embedder.load_embedder", lambda model: MeanColourEmbedder()
    )
    with pytest.raises(ManifestError, match="6 queries are also gallery images"):
        retrieval.evaluate_manifest(tmp_path / "m.csv", ks=(1,))
    # the same file under another spelling of its path is the same image
    spelled = [ManifestRow(both[0].path.parent / ".." / both[0].path.parent.name / "0.jpg",
                           both[0].sku, "query"), both[1], both[3]]  # fmt: skip
    with pytest.raises(ManifestError, match="1 queries"):
        retrieval.evaluate_manifest(spelled, ks=(1,))
    report = retrieval.evaluate_manifest([both[0], both[3], both[5]], ks=(1,))
    assert report.n_queries == 1 and report.n_gallery == 2

    train_rows = [ManifestRow(Path(f"t{n}.jpg"), f"t{n}", "gallery") for n in range(2)]
    trainer = NormSoftmaxTrainer(train_rows, tmp_path / "out", TrainConfig(), both)
    with pytest.raises(ManifestError, match="also gallery images"):
        trainer.check_data()

    shared = [  # one file, the query of one product and a gallery image of another
        *both[1::2],
        ManifestRow(images[both[0].sku][0], "other", "query"),
        ManifestRow(tmp_path / "o.jpg", "other", "gallery"),
    ]
    refused = 0
    for seed in range(10):  # refused whenever both products are held out in one fold
        try:
            held_out_folds(shared, 2, seed=seed)
        except ManifestError as exc:
            assert "held-out rows: 1 queries" in str(exc)
            refused += 1
    assert refused


def test_held_out_folds_take_the_image_limits_prepare_took(tmp_path: Path) -> None:
    """`prepare --folds 3 --min-images 3` keeps other products than the default 2, so other
    folds; held_out_folds could not rebuild them (it had no min_images) and every fold model
    met products it trained on."""
    from snapshop.data.protocol import ProtocolConfig, split_products

    rows = [
        ManifestRow(tmp_path / f"p{p}-{i}.jpg", f"p{p}", "query" if i == 0 else "gallery")
        for p in range(12)
        for i in range(2 + p % 3)  # 2, 3 or 4 images a product
    ]
    for min_images in (2, 3):
        prepared = []
        for fold in range(3):
            config = ProtocolConfig(min_images=min_images, max_images=0, keep_roles=True,
                                    folds=3, fold=fold)  # fmt: skip
            split, _ = split_products(rows, config)
            prepared.append({r.sku for r in split if r.extra["split"] == "test"})
        rebuilt = held_out_folds(rows, 3, min_images=min_images)
        assert [{r.sku for r in fold} for fold in rebuilt] == prepared
    assert {r.sku for fold in held_out_folds(rows, 3, min_images=3) for r in fold} == {
        f"p{p}" for p in range(12) if p % 3
    }


# --- training: divergence, unreadable products, settings -------------------------------------
def test_train_config_refuses_an_infinite_lr_and_a_seed_numpy_cannot_take() -> None:
    from snapshop.train.trainer import TrainConfig

    for bad in ({"lr": float("inf")}, {"seed": -1}, {"seed": 2**32}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)  # type: ignore[arg-type]
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1


def test_held_out_scores_leave_out_a_protocol_no_query_can_answer() -> None:
    from snapshop.train.trainer import held_out_scores

    rows = [
        ManifestRow(Path("q.jpg"), "a", "query"),
        ManifestRow(Path("g1.jpg"), "b", "gallery", {"domain": "iconic"}),
        ManifestRow(Path("g2.jpg"), "a", "gallery", {"domain": "shop"}),
    ]
    vecs = np.eye(3, dtype=np.float32)
    metrics = held_out_scores(vecs, rows, {"domain": "iconic"})
    assert list(metrics) == ["photo_to_all"]  # not photo_to_domain=iconic: R@K NaN
    assert all(np.isfinite(v) for v in metrics["photo_to_all"].values())
    assert held_out_scores(vecs, rows[:2]) == {}


def _tiny_config(**kw: object):
    from snapshop.train.trainer import TrainConfig

    base = dict(
        backbone="efficientnet_lite0",
        dim=8,
        epochs=2,
        classes_per_batch=2,
        samples_per_class=2,
        views=1,
        input_size=64,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _train_rows(tmp_path: Path) -> list[ManifestRow]:
    images = make_images(tmp_path / "shop", n_products=4, per_product=3, size=64)
    return [
        ManifestRow(p, sku, "gallery" if j else "query", {"split": "train" if n < 3 else "test"})
        for n, (sku, paths) in enumerate(images.items())
        for j, p in enumerate(paths)
    ]


@pytest.mark.slow
def test_a_diverged_training_stops_and_exports_nothing(tmp_path: Path) -> None:
    """lr 1e30: the loss turns NaN; before, the run went on, exported NaN weights and a card
    claiming held-out R@1 = 1.0."""
    from snapshop.train.trainer import train

    rows = _train_rows(tmp_path)
    train_rows = [r for r in rows if r.extra["split"] == "train"]
    eval_rows = [r for r in rows if r.extra["split"] == "test"]
    out = tmp_path / "model"
    with pytest.raises(ModelError, match="diverged .*try a lower --lr"):
        train(train_rows, out, _tiny_config(lr=1e30), eval_rows)
    assert not (out / "model.json").exists() and not (out / "model.onnx").exists()


@pytest.mark.slow
def test_training_needs_two_products_with_a_readable_image(tmp_path: Path) -> None:
    from snapshop.train.trainer import train

    rows = [r for r in _train_rows(tmp_path) if r.extra["split"] == "train"]
    first = rows[0].sku
    rows = [
        r if r.sku == first else ManifestRow(tmp_path / "gone.jpg", r.sku, r.role) for r in rows
    ]
    with pytest.raises(ConfigError, match="1 training product"):
        train(rows, tmp_path / "model", _tiny_config(epochs=1))
    assert not (tmp_path / "model" / "model.json").exists()


# --- the detector breakdown reads its CSV as the detector evaluation does ---------------------
def test_breakdown_labels_read_a_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    from snapshop.evaluate.breakdown import photo_labels
    from snapshop.evaluate.detection import load_ground_truth

    boxes = tmp_path / "boxes.csv"
    boxes.write_bytes(
        b"\xef\xbb\xbfpath,group,ccp_label,x1,y1,x2,y2\r\n"
        b"a.jpg,top, blouse ,0,0,10,10\r\n\r\nb.jpg,dress,,0,0,10,20\r\n"
    )
    assert set(load_ground_truth(boxes)) == {"a.jpg", "b.jpg"}
    assert photo_labels(boxes) == {"a.jpg": frozenset({"blouse"}), "b.jpg": frozenset({"dress"})}


# --- bootstrap intervals ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["abc", 1.5, -1, None, True])
def test_bootstrap_seed_must_be_a_non_negative_integer(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        ratio_interval([1, 0], [1, 1], seed=seed)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        paired_ratio_difference(([1], [1]), ([0], [1]), seed=seed)  # type: ignore[arg-type]


def test_bootstrap_intervals_at_the_edges_are_valid_and_match_a_brute_force_draw() -> None:
    assert ratio_interval([1], [1]) == (1.0, 1.0)  # one unit, a hit
    assert ratio_interval([0, 0, 0], [2, 1, 1]) == (0.0, 0.0)  # all misses
    assert ratio_interval([3, 1], [3, 1]) == (1.0, 1.0)  # all hits
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        hits = rng.integers(0, 4, n).astype(float)
        counts = hits + rng.integers(0, 3, n) + (hits == 0)
        draw = np.random.default_rng(7)
        values = []
        for _ in range(300):
            units = draw.integers(0, n, n)
            values.append(hits[units].sum() / counts[units].sum())
        expected = np.quantile(values, [0.025, 0.975])
        assert ratio_interval(hits, counts, resamples=300, seed=7) == pytest.approx(expected)


# --- brute force: R@K (product and image level) and mAP@R on tied, partial data ----------------
def _brute_force(
    sims: np.ndarray, queries: list[str], gallery: list[str], ks: tuple[int, ...]
) -> tuple[dict[int, float], dict[int, float], float]:
    recall: dict[int, list[bool]] = {k: [] for k in ks}
    by_image: dict[int, list[bool]] = {k: [] for k in ks}
    aps = []
    products = sorted(set(gallery))
    for i, p in enumerate(queries):
        if p not in products:
            continue
        best = {o: max(sims[i, j] for j, g in enumerate(gallery) if g == o) for o in products}
        rank = sum(1 for o in products if o != p and best[o] >= best[p])
        image_rank = sum(1 for j, g in enumerate(gallery) if g != p and sims[i, j] >= best[p])
        for k in ks:
            recall[k].append(rank < k)
            by_image[k].append(image_rank < k)
        r = gallery.count(p)
        order = sorted(range(len(gallery)), key=lambda j: (-sims[i, j], gallery[j] == p))
        found, total = 0, 0.0
        for n, j in enumerate(order[:r], start=1):
            if gallery[j] == p:
                found += 1
                total += found / n
        aps.append(total / r)
    mean = lambda d: {k: float(np.mean(v)) for k, v in d.items()}  # noqa: E731
    return mean(recall), mean(by_image), float(np.mean(aps))


def test_metrics_match_a_brute_force_reference_with_ties_and_unanswerable_queries() -> None:
    rng = np.random.default_rng(1)
    ks = (1, 2, 3, 5, 50)  # 50: more than any gallery here
    checked = 0
    for _ in range(150):
        n_products = int(rng.integers(1, 7))
        gallery = [f"p{rng.integers(0, n_products)}" for _ in range(rng.integers(1, 12))]
        queries = [f"p{rng.integers(0, n_products + 1)}" for _ in range(rng.integers(1, 8))]
        if not set(queries) & set(gallery):
            continue
        g = rng.integers(-2, 3, size=(len(gallery), 3)).astype(np.float32)  # many ties
        q = rng.integers(-2, 3, size=(len(queries), 3)).astype(np.float32)
        report = evaluate_embeddings("t", q, queries, g, gallery, ks)
        recall, by_image, map_r = _brute_force(q @ g.T, queries, gallery, ks)
        assert report.recall == pytest.approx(recall)
        assert report.image_recall == pytest.approx(by_image)
        assert report.map_at_r == pytest.approx(map_r)
        assert report.queries_without_gallery == sum(p not in gallery for p in queries)
        for lo, hi in report.recall_ci.values():
            assert 0.0 <= lo <= hi <= 1.0
        checked += 1
    assert checked > 100
