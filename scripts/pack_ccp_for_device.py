"""Pack the ccp-dev training photos (even image ids) for a machine that sees only the repository.

Copies the photos re-encoded as JPEG with the long side capped (never enlarged), their CCP
label masks resized to the same size with nearest-neighbour (PNG), and manifest.csv /
boxes.csv filtered to the packed ids (sizes and boxes rescaled), mask_labels.csv and the
source's licence / README: the layout of ccp-dev, so ``snapshop train-detector`` takes
the folder as its dataset. Only even ids by default: the odd ones are the held-out score.
Never commit the output (``.carry/`` is git-ignored).

    python scripts/pack_ccp_for_device.py ../shared/datasets/ccp-dev .carry/ccp

A ccp-tags folder (``tags.csv``, no masks; issue #21's pseudo-labels) is packed the same way:
its photos re-encoded, ``tags.csv`` rewritten with the new paths and sizes (all ids: the tags
are not a held-out score), so ``train-detector --tags DEST/tags.csv`` reads it::

    python scripts/pack_ccp_for_device.py ../shared/datasets/ccp-tags .carry/ccp-tags --max-mb 32
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

from PIL import Image

from snapshop.data.ccp import has_parity

COPIED_AS_IS = ("mask_labels.csv", "SOURCE_LICENSE_apache2.txt", "SOURCE_README.md")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack(source: Path, dest: Path, *, parity: str, long_side: int, quality: int) -> tuple[int, int]:
    """Write the packed copy; returns (photos, bytes)."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(exist_ok=True)
    for name in COPIED_AS_IS:
        if (source / name).exists():
            shutil.copyfile(source / name, dest / name)
    scales: dict[str, float] = {}
    with open(source / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if has_parity(r["image_id"].strip(), parity)]
        fields = reader.fieldnames or []
    with open(dest / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        for row in rows:
            image_id = row["image_id"].strip()
            mask_src = source / "masks" / f"{image_id}.png"
            if not mask_src.exists():
                continue  # train-detector trains on photos with masks only
            rel = Path("images") / f"{image_id}.jpg"
            photo = Image.open(source / row["path"])
            size = save_reduced(photo, dest / rel, long_side, quality)
            scale = min(1.0, long_side / max(photo.size))  # the factor save_reduced used
            mask = Image.open(mask_src)
            if mask.size != size:
                mask = mask.resize(size, Image.Resampling.NEAREST)  # labels: no blending
            mask.save(dest / "masks" / f"{image_id}.png", optimize=True)
            scales[image_id] = scale
            writer.writerow({**row, "path": rel.as_posix(), "width": size[0], "height": size[1]})
    if (source / "boxes.csv").exists():
        with open(source / "boxes.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            boxes = [r for r in reader if r["image_id"].strip() in scales]
            fields = reader.fieldnames or []
        with open(dest / "boxes.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fields)
            writer.writeheader()
            for row in boxes:
                image_id = row["image_id"].strip()
                scale = scales[image_id]
                for key in ("x1", "y1", "x2", "y2"):
                    row[key] = str(round(float(row[key]) * scale))
                if row.get("mask_px"):
                    row["mask_px"] = str(round(float(row["mask_px"]) * scale * scale))
                row["path"] = f"images/{image_id}.jpg"
                writer.writerow(row)
    return len(scales), folder_bytes(dest)


def save_reduced(photo: Image.Image, dest: Path, long_side: int, quality: int) -> tuple[int, int]:
    """``photo`` as a JPEG at ``dest``, its long side capped at ``long_side`` (never enlarged);
    returns the saved size."""
    photo = photo.convert("RGB")
    scale = min(1.0, long_side / max(photo.size))
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    if size != photo.size:
        photo = photo.resize(size, Image.Resampling.LANCZOS)
    photo.save(dest, quality=quality, optimize=True)
    return size


def pack_tags(source: Path, dest: Path, *, long_side: int, quality: int) -> tuple[int, int]:
    """Write the packed copy of a ccp-tags folder; returns (photos, bytes)."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in COPIED_AS_IS:
        if (source / name).exists():
            shutil.copyfile(source / name, dest / name)
    with open(source / "tags.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows, fields = list(reader), reader.fieldnames or []
    with open(dest / "tags.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        for row in rows:
            rel = Path("images") / f"{row['image_id'].strip()}.jpg"
            width, height = save_reduced(
                Image.open(source / row["path"]), dest / rel, long_side, quality
            )
            writer.writerow({**row, "path": rel.as_posix(), "width": width, "height": height})
    return len(rows), folder_bytes(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source", type=Path, help="ccp-dev folder (manifest.csv, masks/) or ccp-tags (tags.csv)"
    )
    parser.add_argument("dest", type=Path, help="output folder, e.g. .carry/ccp")
    parser.add_argument("--parity", choices=("even", "odd", "all"), default="even")
    parser.add_argument("--long-side", type=int, default=512, help="photos' long side cap (px)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--max-mb", type=float, default=12.0, help="fail above this size (MB)")
    args = parser.parse_args(argv)
    tags = not (args.source / "manifest.csv").exists() and (args.source / "tags.csv").exists()
    if not tags and not (args.source / "manifest.csv").exists():
        parser.error(f"{args.source}: no manifest.csv (ccp-dev) or tags.csv (ccp-tags)")
    if args.dest.exists() and any(args.dest.iterdir()):
        parser.error(f"{args.dest}: exists and is not empty (remove it first)")
    if tags:
        photos, size = pack_tags(
            args.source, args.dest, long_side=args.long_side, quality=args.quality
        )
        what = "tagged photos"
    else:
        photos, size = pack(
            args.source, args.dest, parity=args.parity, long_side=args.long_side,
            quality=args.quality,
        )  # fmt: skip
        what = f"{args.parity}-id photos with masks"
    mb = size / 1e6
    print(f"{args.dest}: {photos} {what}, {mb:.1f} MB")
    if mb > args.max_mb:
        print(f"error: over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
