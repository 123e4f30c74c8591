"""Spatial verification: local features, the ratio test against a brute-force loop, inlier
counts on generated packages, and the bonus that fuses them with the embedding's score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from verify_helpers import package, photographed

from snapshop.errors import ConfigError
from snapshop.verify import (
    LocalFeatures,
    VerifyConfig,
    count_inliers,
    extract,
    ratio_matches,
    verification_bonus,
)


def test_the_same_package_photographed_verifies_far_above_another_package() -> None:
    catalog = extract(package(1))
    same = count_inliers(extract(photographed(package(1))), catalog)
    other = count_inliers(extract(photographed(package(2))), catalog)
    assert same >= 30
    assert same > 3 * max(other, 1)


@pytest.mark.parametrize("transform", ["homography", "similarity"])
def test_a_rotated_smaller_copy_verifies_with_either_transform(transform: str) -> None:
    config = VerifyConfig(transform=transform)
    catalog = extract(package(7), config)
    turned = package(7).rotate(20, expand=True, fillcolor=(90, 90, 90))
    turned = turned.resize((turned.width * 2 // 3, turned.height * 2 // 3))
    same = count_inliers(extract(turned, config), catalog, config)
    other = count_inliers(extract(package(8).rotate(20, expand=True), config), catalog, config)
    assert same >= 30
    assert same > 3 * max(other, 1)


def test_features_are_rootsift_at_the_configured_size() -> None:
    config = VerifyConfig(long_side=200, max_features=50)
    features = extract(package(3, size=(600, 800)), config)
    assert 10 <= len(features) <= 50
    assert features.points[:, 0].max() < 150 + 1 and features.points[:, 1].max() < 200 + 1
    # RootSIFT: non-negative, unit L2 norm (the square root of an L1-normalised histogram)
    assert (features.descriptors >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-3)


def test_a_flat_image_has_no_features_and_verifies_nothing() -> None:
    blank = extract(Image.new("RGB", (200, 200), (255, 255, 255)))
    assert len(blank) == 0
    assert count_inliers(blank, extract(package(1))) == 0
    assert count_inliers(extract(package(1)), blank) == 0


def test_ratio_matches_agree_with_a_brute_force_loop() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 120, (40, 128))
    near = np.clip(base[:25] + rng.integers(-2, 3, (25, 128)), 0, 255)
    query_raw = np.concatenate([near, rng.integers(0, 120, (15, 128))]).astype(np.uint8)
    query = LocalFeatures(rng.random((40, 2)).astype(np.float32), query_raw)
    candidate = LocalFeatures(rng.random((40, 2)).astype(np.float32), base.astype(np.uint8))
    q, c = ratio_matches(query, candidate, 0.8)
    expected = []
    for i, d in enumerate(query.descriptors):
        dist = np.linalg.norm(candidate.descriptors - d, axis=1)
        first, second = np.sort(dist)[:2]
        if first < 0.8 * second:
            expected.append((i, int(np.argmin(dist))))
    assert list(zip(q.tolist(), c.tolist(), strict=True)) == expected
    assert len(expected) >= 25  # the perturbed copies all pass, so the test can fail


def test_ratio_matches_need_two_candidate_features() -> None:
    one = LocalFeatures(np.zeros((1, 2), np.float32), np.ones((1, 128), np.uint8))
    q, c = ratio_matches(one, one, 0.8)
    assert len(q) == len(c) == 0


def test_features_round_trip_through_a_file(tmp_path: Path) -> None:
    features = extract(package(4))
    target = tmp_path / "f.npz"
    with target.open("wb") as fh:
        features.save(fh)
    loaded = LocalFeatures.load(target)
    np.testing.assert_array_equal(loaded.points, features.points)
    np.testing.assert_array_equal(loaded.raw, features.raw)
    assert count_inliers(loaded, features) == count_inliers(features, features) > 100


def test_bonus_is_zero_below_the_floor_and_the_weight_from_twice_the_floor() -> None:
    config = VerifyConfig(min_inliers=10, weight=0.3)
    bonus = verification_bonus(np.array([0, 9, 10, 15, 20, 80]), config)
    np.testing.assert_allclose(bonus, [0, 0, 0, 0.15, 0.3, 0.3])


@pytest.mark.parametrize(
    "field, value",
    [
        ("long_side", 10),
        ("max_features", 2),
        ("ratio", 1.0),
        ("ransac_px", 0.0),
        ("top_k", 0),
        ("min_inliers", 3),
        ("weight", -0.1),
        ("weight", float("nan")),
        ("transform", "affine"),
    ],
)
def test_bad_settings_are_config_errors(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        VerifyConfig(**{field: value})


def test_mismatched_feature_arrays_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="local features"):
        LocalFeatures(np.zeros((3, 2), np.float32), np.zeros((4, 128), np.uint8))
    with pytest.raises(ConfigError, match="uint8"):
        LocalFeatures(np.zeros((4, 2), np.float32), np.zeros((4, 128), np.float32))


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1)),
        Image.new("L", (1, 3000), 128),
        Image.new("RGBA", (50, 20), (10, 200, 30, 0)),
        package(5).convert("P"),
        package(6).convert("I;16"),
    ],
    ids=["1x1", "1x3000", "rgba", "palette", "16-bit"],
)
def test_odd_images_give_features_or_none_without_error(image: Image.Image) -> None:
    features = extract(image, VerifyConfig(max_features=100))
    assert len(features) <= 100
    assert count_inliers(features, extract(package(5))) >= 0
