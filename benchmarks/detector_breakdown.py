"""Where a garment detector fails, per label: for the photos showing each label of a CCP-format
boxes CSV (``ccp_label`` when present, else ``group``), how often each position is right.

A position is right on a photo when it has no ground-truth box and none is predicted, or the
best-scoring prediction there has IoU >= 0.5 with the ground truth (the union of that
position's garment boxes, as ``snapshop evaluate-detector`` scores). Failures are counted as
missed (truth, no prediction), off (IoU < 0.5) or spurious (prediction, no truth). Several
``--fold DETECTOR=BOXES_CSV`` pairs pool cross-validation folds, each detector run only on its
own CSV's photos; the pooled recall and precision per position come first, with 95 % bootstrap
intervals over photos. The counting is :mod:`snapshop.evaluate.breakdown`; this script prints
its tables.

    awk -F, 'NR==1 || ($2+0)%2==1' ../shared/datasets/ccp-dev/boxes.csv > /tmp/boxes_odd.csv
    awk -F, 'NR==1 || ($2+0)%2==0' ../shared/datasets/ccp-dev/boxes.csv > /tmp/boxes_even.csv
    python benchmarks/detector_breakdown.py --images-root ../shared/datasets/ccp-dev \
        --fold segmenter:runs/ccp-cv/wide_even_garment_seg.json=/tmp/boxes_odd.csv \
        --fold segmenter:runs/ccp-cv/wide_odd_garment_seg.json=/tmp/boxes_even.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from snapshop.detect.base import POSITIONS
from snapshop.errors import SnapshopError
from snapshop.evaluate.breakdown import OUTCOMES, breakdown, score_folds


def parse_folds(parser: argparse.ArgumentParser, pairs: list[str]) -> list[tuple[str, Path]]:
    """``DETECTOR=BOXES_CSV`` arguments -> (detector spec, boxes CSV) folds."""
    folds = []
    for pair in pairs:
        spec, sep, boxes = pair.rpartition("=")
        if not sep or not spec:
            parser.error(f"{pair!r}: expected DETECTOR=BOXES_CSV")
        folds.append((spec, Path(boxes)))
    return folds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", action="append", required=True, metavar="DETECTOR=BOXES_CSV")
    parser.add_argument("--images-root", type=Path, required=True)
    parser.add_argument("--min-photos", type=int, default=10, help="rows for labels this common")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    outcomes, pooled = score_folds(parse_folds(parser, args.fold), args.images_root)

    print(f"pooled over {len(outcomes)} photos: recall / precision (95 % interval over photos)")
    print("| position | ground truth | predicted | recall | precision |\n|---|---|---|---|---|")
    for position, score in pooled.items():
        ci = score.intervals()
        print(
            f"| {position} | {score.ground_truth} | {score.predicted} | {score.recall:.3f}"
            f" ({ci['recall'][0]:.3f}–{ci['recall'][1]:.3f}) | {score.precision:.3f}"
            f" ({ci['precision'][0]:.3f}–{ci['precision'][1]:.3f}) |"
        )
    print()
    table = breakdown(outcomes, args.min_photos)
    print(
        f"{len(outcomes)} photos, {len(args.fold)} fold(s); per position: right share, then"
        " missed / off (IoU < 0.5) / spurious counts"
    )
    header = ["label", "photos"] + [f"{p} right" for p in POSITIONS]
    header += [f"{p} missed / off / spurious" for p in POSITIONS]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for label, n, counts in table:
        cells = [label, str(n)] + [f"{counts[p]['right'] / n:.2f}" for p in POSITIONS]
        cells += [" / ".join(str(counts[p][o]) for o in OUTCOMES[1:]) for p in POSITIONS]
        print("| " + " | ".join(cells) + " |")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "pooled": {p: score.to_dict() for p, score in pooled.items()},
                    "labels": [
                        {"label": label, "photos": n, **{p: dict(c) for p, c in counts.items()}}
                        for label, n, counts in table
                    ],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SnapshopError as exc:  # a bad CSV, model or image: one line, no traceback
        sys.exit(f"error: {exc}")
