"""Test-time views: mirror, the catalog image's augmented views, the main-object crop."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from snapshop.errors import ConfigError
from snapshop.models.tta import (
    VIEW_KINDS,
    CatalogAugmentConfig,
    PileConfig,
    catalog_view,
    catalog_views,
    embed_averaged,
    flip_views,
    foreground_mask,
    main_object_crop,
    mirror,
    pile_view,
)


def packshot(size: int = 120, box: tuple[int, int, int, int] = (40, 30, 90, 100)) -> Image.Image:
    """A red product on white, as a catalog image is."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).rectangle(box, fill=(200, 30, 40))
    return image


def test_mirror_flips_left_to_right() -> None:
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    assert mirror(image).getpixel((3, 0)) == (255, 0, 0)
    assert mirror(image).getpixel((0, 0)) == (0, 0, 0)


def test_foreground_mask_is_the_product_without_speckle() -> None:
    image = packshot()
    image.putpixel((5, 5), (0, 0, 0))  # one dark pixel of noise on the white background
    mask = foreground_mask(image)
    expected = np.zeros((120, 120), bool)
    expected[30:101, 40:91] = True
    assert (mask == expected).mean() > 0.995
    assert not mask[5, 5]
    assert not foreground_mask(Image.new("RGB", (50, 50), (250, 250, 250))).any()


def test_catalog_views_cycle_the_kinds_and_are_reproducible() -> None:
    image = packshot()
    first = catalog_views(image, 2 * len(VIEW_KINDS), random.Random(7))
    again = catalog_views(image, 2 * len(VIEW_KINDS), random.Random(7))
    assert len(first) == 2 * len(VIEW_KINDS)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True)
    )
    original = np.asarray(image)
    for view in first:  # every kind changes the image (or its size)
        assert view.size != image.size or not np.array_equal(np.asarray(view), original)
    assert catalog_views(image, 0, random.Random(0)) == []


def test_cut_out_on_grey_keeps_the_product_and_replaces_the_white() -> None:
    config = CatalogAugmentConfig(flip=0.0)
    view = np.asarray(catalog_view(packshot(), "on_grey", random.Random(1), config))
    grey = view[5, 5]
    assert grey[0] == grey[1] == grey[2] and 90 <= grey[0] <= 170  # background now grey
    assert tuple(view[65, 65]) == (200, 30, 40)  # product centre untouched
    cluttered = np.asarray(catalog_view(packshot(), "on_clutter", random.Random(1), config))
    assert tuple(cluttered[65, 65]) == (200, 30, 40)
    assert cluttered[:20].std() > 5  # the white margin became varied clutter


def test_zoom_out_makes_the_product_smaller_on_white() -> None:
    config = CatalogAugmentConfig(flip=0.0, zoom_out=(0.5, 0.5))
    view = catalog_view(packshot(), "zoom_out", random.Random(0), config)
    assert view.size == (240, 240)
    assert foreground_mask(view).sum() == pytest.approx(foreground_mask(packshot()).sum(), rel=0.01)


def test_bad_catalog_view_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        catalog_view(packshot(), "sepia", random.Random(0), CatalogAugmentConfig())
    with pytest.raises(ConfigError):
        catalog_views(packshot(), -1, random.Random(0))
    with pytest.raises(ConfigError):
        CatalogAugmentConfig(crop_scale=(0.9, 0.5))
    with pytest.raises(ConfigError):
        CatalogAugmentConfig(white_threshold=0)


def test_main_object_crop_frames_the_distinct_object() -> None:
    scene = Image.new("RGB", (400, 300), (120, 110, 100))
    ImageDraw.Draw(scene).ellipse((40, 30, 160, 140), fill=(250, 220, 20))  # a lemon, top left
    crop_box = main_object_crop(scene, min_side=0.2)
    # the crop is smaller than the photo and still holds (nearly all of) the lemon
    assert crop_box.width < 250 and crop_box.height < 200
    yellow = (np.asarray(crop_box)[..., 2] < 60).sum()
    assert yellow >= 0.97 * (np.asarray(scene)[..., 2] < 60).sum()


def test_main_object_crop_keeps_a_minimum_size_and_flat_images_whole() -> None:
    scene = Image.new("RGB", (400, 300), (120, 110, 100))
    ImageDraw.Draw(scene).rectangle((190, 140, 200, 150), fill=(255, 0, 0))
    crop = main_object_crop(scene, min_side=0.5)
    assert crop.width >= 199 and crop.height >= 149
    flat = Image.new("RGB", (64, 48), (10, 20, 30))
    assert main_object_crop(flat).size == (64, 48)


def test_embed_averaged_is_the_normalised_mean_of_the_views(lite0_embedder) -> None:
    images = [packshot(), packshot(box=(10, 10, 60, 110))]
    averaged = embed_averaged(lite0_embedder, images, flip_views)
    assert averaged.shape == (2, lite0_embedder.dim)
    for image, vector in zip(images, averaged, strict=True):
        both = lite0_embedder.embed_images([image, mirror(image)])
        expected = both.mean(axis=0) / np.linalg.norm(both.mean(axis=0))
        np.testing.assert_allclose(vector, expected, atol=1e-5)
        plain = lite0_embedder.embed_images([image])[0]
        assert not np.allclose(vector, plain, atol=1e-4)  # the flip did change it
    views = embed_averaged(
        lite0_embedder, images[:1], lambda im: catalog_views(im, 3, random.Random(0))
    )
    again = embed_averaged(
        lite0_embedder, images[:1], lambda im: catalog_views(im, 3, random.Random(0))
    )
    np.testing.assert_allclose(views, again)
    assert np.linalg.norm(views[0]) == pytest.approx(1.0, abs=1e-5)


def test_a_pile_view_heaps_copies_of_the_product_over_a_new_background() -> None:
    """A red disc on white becomes many red discs filling the frame, no white left; the same
    generator state gives the same pile; a blank image is returned as it is."""
    image = Image.new("RGB", (120, 120), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((40, 40, 80, 80), fill=(220, 20, 20))
    pile = pile_view(image, random.Random(3))
    assert pile.size == image.size
    px = np.asarray(pile).astype(int)
    red = (px[..., 0] > 180) & (px[..., 1] < 80) & (px[..., 2] < 80)
    white = (px >= 235).all(axis=2)
    assert red.mean() > 0.3  # one disc covered 0.09 of the catalog image
    assert white.mean() < 0.01
    assert np.array_equal(np.asarray(pile_view(image, random.Random(3))), np.asarray(pile))
    blank = Image.new("RGB", (50, 50), (255, 255, 255))
    assert np.array_equal(np.asarray(pile_view(blank, random.Random(0))), np.asarray(blank))
    with pytest.raises(ConfigError, match="grid"):
        PileConfig(grid=(4, 2))
