"""Pack the ccp-dev training photos (even image ids) for a machine that sees only the repository.

Copies the photos re-encoded as JPEG with the long side capped (never enlarged), their CCP
label masks resized to the same size with nearest-neighbour (PNG), and manifest.csv /
boxes.csv filtered to the packed ids (sizes and boxes rescaled), mask_labels.csv and the
source's licence / README: the layout of ccp-dev, so ``snapshop train-detector`` takes
the folder as its dataset. Only even ids by default: the odd ones are the held-out score.
Never commit the output (``.carry/`` is git-ignored).

    python scripts/pack_ccp_for_device.py ../shared/datasets/ccp-dev .carry/ccp
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
            photo = Image.open(source / row["path"]).convert("RGB")
            scale = min(1.0, long_side / max(photo.size))
            size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
            if size != photo.size:
                photo = photo.resize(size, Image.Resampling.LANCZOS)
            rel = Path("images") / f"{image_id}.jpg"
            photo.save(dest / rel, quality=quality, optimize=True)  # smaller, same pixels
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="ccp-dev folder (manifest.csv, masks/)")
    parser.add_argument("dest", type=Path, help="output folder, e.g. .carry/ccp")
    parser.add_argument("--parity", choices=("even", "odd", "all"), default="even")
    parser.add_argument("--long-side", type=int, default=512, help="photos' long side cap (px)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--max-mb", type=float, default=12.0, help="fail above this size (MB)")
    args = parser.parse_args(argv)
    if not (args.source / "manifest.csv").exists():
        parser.error(f"{args.source}: no manifest.csv")
    if args.dest.exists() and any(args.dest.iterdir()):
        parser.error(f"{args.dest}: exists and is not empty (remove it first)")
    photos, size = pack(
        args.source, args.dest, parity=args.parity, long_side=args.long_side, quality=args.quality
    )
    mb = size / 1e6
    print(f"{args.dest}: {photos} {args.parity}-id photos with masks, {mb:.1f} MB")
    if mb > args.max_mb:
        print(f"error: over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
