"""Garment presence against image-level tags (ccp-tags): does a detector find an upper / lower
garment exactly where the tags say there is one?

ccp-tags has no boxes, only which garments a photo shows, and no model here was fitted on it,
so this is a held-out, paired comparison of detector settings (same photos for every spec).
It scores presence only, not box placement (that needs ccp-dev's boxes: evaluate-detector).

    python benchmarks/tag_presence.py ../shared/datasets/ccp-tags/tags.csv \
        --detector segmenter:long_side=320 --detector segmenter
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from snapshop.detect.base import POSITIONS, keep_best_per_position
from snapshop.detect.factory import create_detector
from snapshop.images import load_image

TRUTH_COLUMN = {"upper": "has_upper", "lower": "has_lower"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tags", type=Path, help="ccp-tags/tags.csv (path, ..., has_upper, has_lower)")
    ap.add_argument("--detector", action="append", required=True, help="detector spec (repeat)")
    ap.add_argument("--limit", type=int, default=0, help="first N photos only (0: all)")
    args = ap.parse_args()

    with args.tags.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if args.limit:
        rows = rows[: args.limit]
    detectors = {spec: create_detector(spec) for spec in args.detector}
    # counts[spec][position] = [true positive, false positive, false negative, true negative]
    counts = {spec: {pos: [0, 0, 0, 0] for pos in POSITIONS} for spec in detectors}
    for row in rows:
        image = load_image(args.tags.parent / row["path"])
        for spec, detector in detectors.items():
            assert detector is not None, f"{spec} names no detector"
            found = keep_best_per_position(detector.detect(image))
            for pos in POSITIONS:
                present = row[TRUTH_COLUMN[pos]].strip().lower() in ("1", "true", "yes")
                cell = (0 if present else 1) if pos in found else (2 if present else 3)
                counts[spec][pos][cell] += 1

    print(f"{len(rows)} photos\n")
    print("| detector | position | presence recall | presence precision | tp | fp | fn | tn |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, by_position in counts.items():
        for pos, (tp, fp, fn, tn) in by_position.items():
            recall = tp / max(tp + fn, 1)
            precision = tp / max(tp + fp, 1)
            print(
                f"| `{spec}` | {pos} | {recall:.3f} | {precision:.3f} | {tp} | {fp} | {fn} | {tn} |"
            )


if __name__ == "__main__":
    main()
