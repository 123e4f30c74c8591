"""Choose the `segmenter` detector's box-extraction thresholds on labelled photos.

The network runs once per photo; every grid point then only re-reads its class probabilities
(connected components, dress share), so a few hundred settings take about a minute. Prints the
best settings by the mean of upper/lower recall and precision (IoU >= 0.5, one box per
position, as `snapshop evaluate-detector` scores), and with ``--write-card`` stores the best one
in the model's card (``config``), which the detector reads at load time.

Choose on the ids the head was fitted on (even), score on the held-out ones (odd):

    awk -F, 'NR==1 || ($2+0)%2==0' ../shared/datasets/ccp-dev/boxes.csv > /tmp/boxes_even.csv
    python benchmarks/segmenter_box_grid.py --boxes /tmp/boxes_even.csv \
        --images-root ../shared/datasets/ccp-dev --model src/snapshop/detect/weights
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np

from snapshop.detect.segmenter import (
    SegmenterDetector,
    boxes_from_probabilities,
    model_files,
)
from snapshop.evaluate.detection import PositionScore, load_ground_truth, score_image
from snapshop.images import load_image

GRID = {
    "min_area": (0.005, 0.01, 0.02),
    "keep_fraction": (0.02, 0.05, 0.1, 0.2, 0.35),
    "open_px": (0, 3, 5),
    "dress_share": (0.3, 0.4, 0.5, 0.6, 0.7),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=Path, required=True)
    parser.add_argument("--images-root", type=Path, required=True)
    parser.add_argument("--model", default=None, help="model folder or *garment_seg.json")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--write-card", action="store_true")
    parser.add_argument("--json-out", type=Path, help="every setting's numbers (JSON lines)")
    args = parser.parse_args()

    detector = SegmenterDetector(args.model)
    truth = load_ground_truth(args.boxes)
    t0 = time.perf_counter()
    cached = []
    for path in sorted(truth):
        rgb = np.asarray(load_image(args.images_root / path))
        probs, scale = detector.probabilities(rgb)
        cached.append((truth[path], probs, scale, (rgb.shape[1], rgb.shape[0])))
    print(f"{len(cached)} photos through the network in {time.perf_counter() - t0:.0f} s")

    base = detector.config
    results = []
    for values in itertools.product(*GRID.values()):
        config = dataclasses.replace(base, **dict(zip(GRID, values, strict=True)))
        positions: dict[str, PositionScore] = {}
        for gt, probs, scale, size in cached:
            score_image(gt, boxes_from_probabilities(probs, scale, size, config), positions)
        u, lo = positions["upper"], positions["lower"]
        numbers = (u.recall, u.precision, lo.recall, lo.precision)
        results.append((float(np.mean(numbers)), numbers, config))
    results.sort(key=lambda r: -r[0])
    current = next(r for r in results if r[2] == base)

    print("| mean | upper R | upper P | lower R | lower P | " + " | ".join(GRID) + " |")
    print("|" + "---|" * (5 + len(GRID)))
    for mean, numbers, config in [*results[: args.top], current]:
        cells = [f"{mean:.3f}", *(f"{n:.3f}" for n in numbers)]
        cells += [str(getattr(config, k)) for k in GRID]
        mark = " (current)" if config == base else ""
        print("| " + " | ".join(cells) + f" |{mark}")

    if args.json_out:
        with open(args.json_out, "w") as fh:
            for mean, numbers, config in results:
                setting = {k: getattr(config, k) for k in GRID}
                fh.write(json.dumps({"setting": setting, "mean": mean, "numbers": numbers}) + "\n")

    if args.write_card:
        _, card_path, _ = model_files(args.model)
        card = json.loads(Path(card_path).read_text())
        card["config"] = dataclasses.asdict(results[0][2])
        card["config_chosen_on"] = (
            f"{args.boxes.name}: {len(cached)} photos, grid {GRID}, best mean of upper/lower"
            " recall and precision at IoU 0.5 (benchmarks/segmenter_box_grid.py)"
        )
        Path(card_path).write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote config {card['config']} to {card_path}")


if __name__ == "__main__":
    main()
