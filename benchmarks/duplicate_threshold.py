"""Precision and recall of near-duplicate detection per similarity threshold.

Generates ``--products`` distinct demo products (two photos each, one listing per product)
and, for each product's first photo, edited copies listed as other products: re-encoded
(JPEG q 30), resized (50 %), cropped (80 % of each side, centred), watermarked (text and a
logo over the photo), and all four together. Indexes them into a catalog with the given model
(no detector), finds every cross-product pair above 0.5 with ``duplicates.candidate_pairs``,
and prints, per threshold: precision (pairs derived from one photo / all pairs reported),
recall over every such pair, and recall per kind of copy (original vs copy).
Pairs of a copy with its product's *other* photo are neither: they are left out of both.
``--photos MANIFEST`` takes the two photos of each product from a dataset manifest instead of
generating them (read where they lie, resized to ``--size`` in a temporary folder).

    python benchmarks/duplicate_threshold.py --products 80
    python benchmarks/duplicate_threshold.py --products 80 \
        --photos ../shared/datasets/grocery-dev/manifest.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from snapshop import api
from snapshop.catalog.catalog import open_catalog
from snapshop.data.manifest import read_manifest
from snapshop.demo import demo_products, render
from snapshop.duplicates import candidate_pairs, pixel_signatures, pixel_similarity
from snapshop.images import load_image

KINDS = ("reencode", "resize", "crop", "watermark", "all")
THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)
FLOORS = (0.7, 0.8, 0.85)
PIXEL_THRESHOLDS = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def watermark(image: Image.Image) -> Image.Image:
    out = image.convert("RGBA")
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    w, h = out.size
    for y in range(h // 6, h, h // 3):
        draw.text((w // 10, y), "SAMPLE  SHOP.EXAMPLE", fill=(255, 255, 255, 150))
    draw.rectangle((w - w // 4, h - h // 8, w - 4, h - 4), fill=(20, 20, 160, 170))
    return Image.alpha_composite(out, overlay).convert("RGB")


def edit(image: Image.Image, kind: str, path: Path) -> None:
    w, h = image.size
    quality = 92
    if kind in ("crop", "all"):
        image = image.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    if kind in ("resize", "all"):
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)
    if kind in ("watermark", "all"):
        image = watermark(image)
    if kind in ("reencode", "all"):
        quality = 30
    image.save(path, quality=quality)


def photo_pairs(n_products: int, size: int, manifest: Path | None) -> Iterator[tuple[str, list]]:
    """(sku, [two photos]) of ``n_products`` products: rendered, or read from ``manifest``."""
    if manifest is None:
        for n, product in enumerate(demo_products(n_products, seed=1)):
            yield product.sku, [render(product, 100 * n + j, size=size) for j in range(2)]
        return
    by_product: dict[str, list[Path]] = {}
    for row in read_manifest(manifest):
        by_product.setdefault(row.sku, []).append(row.path)
    chosen = [p for p in sorted(by_product) if len(by_product[p]) >= 2][:n_products]
    for product in chosen:
        photos = []
        for path in by_product[product][:2]:
            image = load_image(path)
            image.thumbnail((size, size))
            photos.append(image)
        yield product, photos


def generate(
    root: Path, n_products: int, size: int, manifest: Path | None
) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A catalog CSV and {file name: (product, kind)} with kind "photo0", "photo1" or a copy."""
    rows, origin = [], {}
    for sku, photos in photo_pairs(n_products, size, manifest):
        for j, photo in enumerate(photos):
            path = root / f"{sku}-photo{j}.jpg"
            photo.save(path, quality=92)
            rows.append([sku, path])
            origin[path.name] = (sku, f"photo{j}")
        first = photos[0]
        for kind in KINDS:
            path = root / f"{sku}-copy-{kind}.jpg"
            edit(first, kind, path)
            rows.append([f"{sku}-copy-{kind}", path])  # listed as another product
            origin[path.name] = (sku, kind)
    manifest = root / "catalog.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "image_path"])
        writer.writerows(rows)
    return manifest, origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=80)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--model", default="efficientnet_lite2")
    parser.add_argument("--photos", type=Path, default=None, help="Dataset manifest CSV.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        manifest, origin = generate(root / "images", args.products, args.size, args.photos)
        t = time.perf_counter()
        api.index_source(manifest, root / "catalog", model=args.model, detector="none", workers=0)
        index_s = time.perf_counter() - t
        catalog = open_catalog(root / "catalog")
        try:
            t = time.perf_counter()
            found = candidate_pairs(catalog, 0.5, neighbours=64)
            search_s = time.perf_counter() - t
            source = {
                i.id: Path(i.source).name
                for p in catalog.store.list_products(limit=10**6)
                for i in catalog.store.images_of(p.id)
            }
        finally:
            catalog.close()
        scored = {frozenset((source[a], source[b])): s for (a, b), s in found.items()}
        # The pixel check, on every pair that could pass the lowest vector floor below.
        signatures = {name: pixel_signatures(Image.open(root / "images" / name)) for name in origin}
        pixels = {
            pair: pixel_similarity(*(signatures[n] for n in pair))
            for pair, s in scored.items()
            if s >= min(FLOORS)
        }

    # Every pair of files derived from one product's first photo (its copies and itself,
    # each listed as a different product) is a true duplicate.
    derived = [n for n, (_, kind) in origin.items() if kind != "photo1"]
    truth = {
        frozenset(pair)
        for pair in itertools.combinations(derived, 2)
        if origin[pair[0]][0] == origin[pair[1]][0]
    }
    ambiguous = {
        frozenset((a, b))
        for a, b in itertools.permutations(origin, 2)
        if origin[a][0] == origin[b][0] and origin[a][1] == "photo1" and origin[b][1] in KINDS
    }
    by_kind = {
        kind: {
            frozenset((f"{sku}-photo0.jpg", f"{sku}-copy-{kind}.jpg"))
            for sku, _ in set(origin.values())
        }
        for kind in KINDS
    }

    def row(label: str, reported: set[frozenset[str]]) -> str:
        reported = reported - ambiguous
        true_positive = len(reported & truth)
        precision = true_positive / len(reported) if reported else 1.0
        per_kind = [len(pairs & reported) / len(pairs) for pairs in by_kind.values()]
        return (
            f"| {label} | {len(reported)} | {precision:.3f} | {true_positive / len(truth):.3f}"
            " | " + " | ".join(f"{r:.3f}" for r in per_kind) + " |"
        )

    header = (
        "| pairs reported | precision | recall (all derived pairs) | "
        + " | ".join(f"recall {k}" for k in KINDS)
        + " |"
    )
    rule = "|---" * (4 + len(KINDS)) + "|"
    where = args.photos or "generated demo products"
    n_products = len(origin) // (2 + len(KINDS))
    print(
        f"{where}: {n_products} distinct products x 2 photos + {len(KINDS)} edited copies"
        f" of each first photo = {len(origin)} images, model {args.model}; indexing"
        f" {index_s:.0f} s, all-pairs search {search_s:.1f} s\n"
    )
    print("Vector similarity alone:\n")
    print("| vector threshold " + header + "\n" + rule)
    for threshold in THRESHOLDS:
        print(row(f"{threshold:.2f}", {p for p, s in scored.items() if s >= threshold}))
    negatives = sorted(
        (s for p, s in scored.items() if p not in truth and p not in ambiguous), reverse=True
    )
    print(f"\nhighest vector score of a pair of distinct products: {negatives[0]:.4f}")

    print("\nVector candidates confirmed by the pixel check (duplicates.pixel_similarity):\n")
    print("| vector floor, pixel threshold " + header + "\n" + rule)
    for floor, pixel in itertools.product(FLOORS, PIXEL_THRESHOLDS):
        kept = {p for p, s in pixels.items() if s >= pixel and scored[p] >= floor}
        print(row(f"{floor:.2f}, {pixel:.2f}", kept))
    negatives = sorted(
        (pixels[p] for p in pixels if p not in truth and p not in ambiguous), reverse=True
    )
    print(
        f"\nhighest pixel score of a pair of distinct products (vector >= {min(FLOORS)}):"
        f" {negatives[0] if negatives else float('nan'):.4f}"
    )


if __name__ == "__main__":
    main()
