"""Two garment detectors on the same cross-validation folds, paired: pooled recall / precision
per position of each, and the variant's difference with a paired bootstrap interval over photos
(each draw resamples the photos once for both detectors).

``--base`` and ``--variant`` take ``DETECTOR=BOXES_CSV`` once per fold, in the same fold order
(each detector runs only on its own CSV's photos, as ``detector_breakdown.py`` pools them).
Issue #21 used it for the tag-constrained pseudo-labels (docs/benchmarks/detection.md)::

    python benchmarks/detector_compare.py --images-root ../shared/datasets/ccp-dev \\
        --base segmenter:runs/pl/head_even_teacher_garment_seg.json=/tmp/boxes_odd.csv \\
        --base segmenter:runs/pl/head_odd_teacher_garment_seg.json=/tmp/boxes_even.csv \\
        --variant segmenter:runs/pl/head_even_garment_seg.json=/tmp/boxes_odd.csv \\
        --variant segmenter:runs/pl/head_odd_garment_seg.json=/tmp/boxes_even.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from detector_breakdown import parse_folds  # noqa: E402

from snapshop.detect.base import POSITIONS  # noqa: E402
from snapshop.errors import SnapshopError  # noqa: E402
from snapshop.evaluate.breakdown import score_folds  # noqa: E402
from snapshop.evaluate.detection import PositionScore  # noqa: E402
from snapshop.evaluate.stats import paired_ratio_difference  # noqa: E402


def columns(score: PositionScore, metric: str) -> tuple[list[int], list[int]]:
    """Per-photo (numerators, denominators) of recall or precision."""
    rows = score.per_image
    den = [gt for gt, _, _ in rows] if metric == "recall" else [pred for _, pred, _ in rows]
    return [tp for _, _, tp in rows], den


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="append", required=True, metavar="DETECTOR=BOXES_CSV")
    parser.add_argument("--variant", action="append", required=True, metavar="DETECTOR=BOXES_CSV")
    parser.add_argument("--images-root", type=Path, required=True)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    base_folds = parse_folds(parser, args.base)
    variant_folds = parse_folds(parser, args.variant)
    if [b for _, b in base_folds] != [b for _, b in variant_folds]:
        parser.error("--base and --variant must name the same boxes CSVs in the same order")

    outcomes, base = score_folds(base_folds, args.images_root)
    _, variant = score_folds(variant_folds, args.images_root)
    print(f"{len(outcomes)} photos, {len(base_folds)} fold(s); [95 % bootstrap interval]")
    print("| position | metric | base | variant | variant − base [paired interval] |")
    print("|---|---|---|---|---|")
    report: dict[str, dict[str, dict[str, float]]] = {}
    for position in POSITIONS:
        for metric in ("recall", "precision"):
            a, b = base[position], variant[position]
            delta, lo, hi = paired_ratio_difference(columns(a, metric), columns(b, metric))
            ci_a, ci_b = a.intervals()[metric], b.intervals()[metric]
            print(
                f"| {position} | {metric} | {getattr(a, metric):.3f} [{ci_a[0]:.3f}, {ci_a[1]:.3f}]"
                f" | {getattr(b, metric):.3f} [{ci_b[0]:.3f}, {ci_b[1]:.3f}]"
                f" | {delta:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
            )
            report.setdefault(position, {})[metric] = {
                "base": getattr(a, metric),
                "variant": getattr(b, metric),
                "delta": delta,
                "delta_ci95_lo": lo,
                "delta_ci95_hi": hi,
            }
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SnapshopError as exc:  # a bad CSV, model or image: one line, no traceback
        sys.exit(f"error: {exc}")
