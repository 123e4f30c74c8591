"""benchmarks/catalog_levers.py: best-view scoring, pooled ranks and the paired difference."""

from __future__ import annotations

import numpy as np
import pytest
from script_helpers import load_script

levers = load_script("benchmarks/catalog_levers.py")


def test_similarities_score_each_image_by_its_best_view() -> None:
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    gallery = np.array([[[0.6, 0.8], [1.0, 0.0]], [[0.0, 1.0], [0.8, 0.6]]], np.float32)
    sims = levers.similarities(queries, gallery)
    np.testing.assert_allclose(sims, [[1.0, 0.8], [0.8, 1.0]])
    flat = levers.similarities(queries, gallery[:, 0])  # one vector per image: plain cosine
    np.testing.assert_allclose(flat, queries @ gallery[:, 0].T)


def test_ranked_pools_product_and_image_ranks_with_global_labels() -> None:
    ranked = levers.Ranked([], [], [])
    # gallery: two images of "b" then one of "a"; the query of "a" ranks 2nd product, 3rd image
    sims = np.array([[0.9, 0.8, 0.7], [0.1, 0.9, 0.2]], np.float32)
    ranked.add(sims, ["a", "b"], ["b", "b", "a"], {"a": 0, "b": 1})
    cells = ranked.cells()
    assert cells["R@1"] == 0.5 and cells["img R@1"] == 0.5
    assert ranked.product[0].tolist() == [1, 0] and ranked.image[0].tolist() == [2, 0]
    assert ranked.labels[0].tolist() == [0, 1]


def test_paired_delta_is_the_difference_with_an_interval_around_it() -> None:
    labels = np.repeat(np.arange(10), 4)
    base = levers.Ranked([np.ones(40, np.int64)], [np.ones(40, np.int64)], [labels])
    better = np.ones(40, np.int64)
    better[labels < 5] = 0  # half the products now hit at rank 0
    lever = levers.Ranked([better], [better], [labels])
    text = levers.paired_delta(lever, base)
    value, interval = text.split(" ", 1)
    assert float(value) == pytest.approx(0.5)
    lo, hi = (float(x) for x in interval.strip("[]").split(", "))
    assert 0 < lo < 0.5 < hi <= 1
    assert levers.paired_delta(base, base) == "+0.000 [+0.000, +0.000]"


def test_domain_centring_subtracts_each_domains_mean_then_renormalises() -> None:
    rng = np.random.default_rng(0)
    q, cat, p = (rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 2, 5))
    train_q = np.array([True, False, True, False])
    train_p = np.array([False, True, True, False, False])
    cq, ccat, cp = levers.centre_domains(q, cat, p, train_q, train_p)
    photo_mean = np.mean([q[0], q[2], p[1], p[2]], axis=0)  # the training products' photos only
    for got, rows, mean in ((cq, q, photo_mean), (ccat, cat, cat.mean(0)), (cp, p, photo_mean)):
        for g, row in zip(got, rows, strict=True):
            want = (row - mean) / np.linalg.norm(row - mean)
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
