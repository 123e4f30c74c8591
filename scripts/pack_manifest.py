"""Copy a manifest's images into one folder (re-encoded JPEG, long side capped) with a manifest
whose paths are relative to it: the data a training run needs on another machine (e.g. the
GPU machine, which sees only the repository, not ../shared). Never commit the output.

    python scripts/pack_manifest.py runs/grocery/split.csv .carry/grocery --where split=train
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

from snapshop.data.manifest import matches, parse_where, read_manifest
from snapshop.errors import ImageDecodeError, SnapshopError
from snapshop.images import load_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--long-side", type=int, default=348)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--where", action="append", default=[], help="COLUMN=VALUE filter")
    args = parser.parse_args(argv)

    try:
        wanted = parse_where(args.where)
        rows = [r for r in read_manifest(args.manifest) if matches(r, wanted)]
    except SnapshopError as exc:  # a bad CSV or filter: one line, nothing written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    header = ["path", "product_id", "role", *sorted({k for r in rows for k in r.extra})]
    written = skipped = 0
    with open(args.out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        for row in rows:
            try:
                image = load_image(row.path)
            except ImageDecodeError as exc:
                print(f"skipping {row.path}: {exc.reason}")
                skipped += 1
                continue
            image.thumbnail((args.long_side, args.long_side))
            name = hashlib.sha256(str(row.path).encode()).hexdigest()[:16] + ".jpg"
            image.save(args.out / "images" / name, quality=args.quality)
            writer.writerow({"path": f"images/{name}", "product_id": row.sku,
                             "role": row.role, **row.extra})  # fmt: skip
            written += 1
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{written} images ({skipped} skipped), {size / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
