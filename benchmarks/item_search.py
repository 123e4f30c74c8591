"""Item-based vs image-based search on CCP street photos with a changed background and scale.

Catalog: N ccp-dev photos (odd image ids by default: not used to fit the pose detector), one
product each, indexed with a detector (default ``pose``) so each photo also stores its upper /
lower garment crops. Queries: each catalog photo's person (cut out with CCP's pixel labels),
rescaled by a random factor in [0.55, 0.85] and pasted at a random place on *another* CCP photo
blurred beyond recognition. A query hits when the source product is in the top K of the
image-based list, or of the item-based list of a position (counted over queries whose source
has a ground-truth garment there; no detection at that position counts as a miss).

    python benchmarks/item_search.py --dataset ../shared/datasets/ccp-dev --n 100

``--flat`` builds a shop of flat product shots instead: each photo's upper garments (tops,
outwear or a dress) and its lower garment, cut out with CCP's pixel labels and centred on
white, are two products (``ccp-ID-upper``, ``ccp-ID-lower``) with the categories ``Tops`` and
``Trousers`` (``--no-categories``: none; ``--packshot``: the rows say they are packshots, so
the catalog side is not detected); an item list hits when it ranks the product of its own
position, the image list when it ranks either of the photo's products.

``--busy N`` keeps N other processes busy (a spinning loop each) while the queries run: the
latency of a machine that is not idle. ``SNAPSHOP_ORT_SPINNING=1`` restores ONNX Runtime's
spinning workers for comparison.
"""

from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from snapshop import api
from snapshop.evaluate.detection import load_ground_truth
from snapshop.evaluate.stats import ratio_interval
from snapshop.train.segmenter import segmenter_label_table


def make_query(
    photo: Image.Image, labels: np.ndarray, background: Image.Image, rng: random.Random
) -> Image.Image:
    """The person of ``photo`` (labels > 0) scaled and pasted on a blurred ``background``."""
    w, h = photo.size
    canvas = background.resize((w, h)).filter(ImageFilter.GaussianBlur(radius=12))
    scale = rng.uniform(0.55, 0.85)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    person = photo.resize((sw, sh), Image.Resampling.BILINEAR)
    alpha = Image.fromarray(((labels > 0) * 255).astype(np.uint8)).resize((sw, sh))
    canvas.paste(person, (rng.randint(0, w - sw), rng.randint(0, h - sh)), alpha)
    return canvas


def flat_shot(photo: Image.Image, classes: np.ndarray, keep: tuple[int, ...]) -> Image.Image | None:
    """The pixels of ``photo`` whose class is in ``keep``, cropped with a margin, on white;
    None when they cover under 1 % of the photo."""
    mask = np.isin(classes, keep)
    if mask.mean() < 0.01:
        return None
    ys, xs = np.nonzero(mask)
    margin = max(4, int(0.05 * max(np.ptp(ys), np.ptp(xs))))
    y1, y2 = max(0, ys.min() - margin), ys.max() + 1 + margin
    x1, x2 = max(0, xs.min() - margin), xs.max() + 1 + margin
    pixels = np.full_like(np.asarray(photo), 255)
    pixels[mask] = np.asarray(photo)[mask]
    return Image.fromarray(pixels[y1:y2, x1:x2])


def _spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/ccp-dev"))
    parser.add_argument("--n", type=int, default=100, help="catalog photos (= queries)")
    parser.add_argument("--detector", default="pose")
    parser.add_argument("--model", default=None, help="backbone (default: efficientnet_lite2)")
    parser.add_argument("--parity", choices=("odd", "even", "all"), default="odd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--busy", type=int, default=0, help="busy processes beside the queries")
    parser.add_argument("--flat", action="store_true", help="catalog of flat product shots")
    parser.add_argument("--no-categories", action="store_true", help="--flat without categories")
    parser.add_argument("--packshot", action="store_true", help="--flat rows marked packshot=1")
    args = parser.parse_args()
    if (args.no_categories or args.packshot) and not args.flat:
        parser.error("--no-categories and --packshot describe a --flat catalog")
    if args.busy < 0 or args.n < 2:
        parser.error("--busy must be >= 0 and --n >= 2")
    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(args.seed)
    with open(args.dataset / "manifest.csv", newline="") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if args.parity == "all" or int(r["image_id"]) % 2 == (args.parity == "odd")
        ]
    rows = rows[: args.n]
    truth = load_ground_truth(args.dataset / "boxes.csv")
    # other, upper, lower, dress
    ccp_classes = segmenter_label_table(args.dataset / "mask_labels.csv")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="item-search-"))
    manifest = work / "catalog.csv"
    made: set[str] = set()  # --flat: the products written
    work.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "image_path", "category", "packshot"])
        for r in rows:
            if not args.flat:
                path = str((args.dataset / r["path"]).resolve())
                writer.writerow([f"ccp-{r['image_id']}", path, "", ""])
                continue
            photo = Image.open(args.dataset / r["path"]).convert("RGB")
            mask = np.asarray(Image.open(args.dataset / "masks" / f"{r['image_id']}.png"))
            classes = ccp_classes[mask]
            (work / "flat").mkdir(exist_ok=True)
            for key, keep, category in (("upper", (1, 3), "Tops"), ("lower", (2,), "Trousers")):
                shot = flat_shot(photo, classes, keep)
                if shot is not None:
                    path = work / "flat" / f"{r['image_id']}-{key}.jpg"
                    shot.save(path, quality=90)
                    writer.writerow(
                        [
                            f"ccp-{r['image_id']}-{key}",
                            str(path.resolve()),
                            "" if args.no_categories else category,
                            "1" if args.packshot else "",
                        ]
                    )
                    made.add(f"ccp-{r['image_id']}-{key}")
    t0 = time.perf_counter()
    report = api.index_source(manifest, work / "catalog", model=args.model, detector=args.detector)
    index_s = time.perf_counter() - t0
    print(f"indexed {report.added} photos, {report.crops} crops in {index_s:.1f} s")

    searcher = api.open_searcher(work / "catalog")
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    k_max = 5
    # per list, one (hit at 1, hit at 5) pair per query counted there
    hits: dict[str, list[tuple[bool, bool]]] = {"image": [], "upper": [], "lower": []}
    found_pos = {"upper": 0, "lower": 0}
    detect_ms, total_ms = [], []
    stages: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        photo = Image.open(args.dataset / r["path"]).convert("RGB")
        labels = np.asarray(Image.open(args.dataset / "masks" / f"{r['image_id']}.png"))
        other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]
        background = Image.open(args.dataset / other["path"]).convert("RGB")
        query = make_query(photo, labels, background, rng)
        result = searcher.search(query, k=k_max)
        detect_ms.append(result.timings_ms["detect"])
        total_ms.append(result.timings_ms["total"])
        for stage, ms in result.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
        sku = f"ccp-{r['image_id']}"
        # --flat: the image list hits with either of the photo's products
        lists = {
            "image": [
                h.sku.removesuffix("-upper").removesuffix("-lower") for h in result.image_results
            ]
        }
        for item in result.item_results:
            lists[item.position] = [h.sku for h in item.results]
        for key in hits:
            target = sku
            if key != "image" and args.flat:
                target = f"{sku}-{key}"
                if target not in made:
                    continue
            elif key != "image" and key not in truth.get(r["path"], {}):
                continue
            ranked = lists.get(key, [])
            if key != "image" and key in lists:
                found_pos[key] += 1
            hits[key].append((ranked[:1] == [target], target in ranked[:k_max]))
    searcher.catalog.close()
    for process in busy:
        process.terminate()

    spinning = os.environ.get("SNAPSHOP_ORT_SPINNING", "0") == "1"
    print(
        f"\n{len(rows)} queries (catalog of {len(rows)} CCP photos, detector {args.detector},"
        f" load {os.getloadavg()[0]:.1f}, {args.busy} busy processes, ORT spinning {spinning})"
    )
    print("| result list | queries | detected | R@1 (95 % interval) | R@5 (95 % interval) |")
    print("|---|---|---|---|---|")
    for key, found in hits.items():
        det = "-" if key == "image" else f"{found_pos[key]}"
        cells = []
        for at in (0, 1):
            won = np.array([pair[at] for pair in found], np.float64)
            lo, hi = ratio_interval(won, np.ones_like(won))  # queries are the units
            cells.append(f"{won.mean() if len(won) else 0.0:.3f} ({lo:.3f}–{hi:.3f})")
        print(f"| {key} | {len(found)} | {det} | {cells[0]} | {cells[1]} |")
    print(
        f"\ndetect ms/query: p50 {np.median(detect_ms):.1f}, mean {np.mean(detect_ms):.1f};"
        f" whole query (decode+detect+embed+search): p50 {np.median(total_ms):.1f},"
        f" mean {np.mean(total_ms):.1f}"
    )
    print("stage p50 ms: " + ", ".join(f"{k} {np.median(v):.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
