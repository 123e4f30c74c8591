"""Cross-validated retrieval on unseen products: each fold's model scored on its own held-out
products, the ranks pooled over the folds, so every product of the dataset counts as unseen.

The folds are the protocol's (``snapshop prepare --folds K --fold N``, same seed and options
as the training side, benchmarks/metric_learning_cv_gpu.sh). Both protocols of grocery-dev:
photo -> the fold's whole held-out gallery, and photo -> the fold's catalog images only
(``--catalog-where``). Columns: each ``--baseline`` model (the same for every fold, embedded
once) and the fold models (``--fold-models``, one directory per fold, in fold order).
R@K with a 95 % bootstrap interval over products (all photos of a product resampled together).
The scoring is :func:`snapshop.evaluate.crossval.cross_validate`; this script prints its tables.

    python benchmarks/grocery_cv.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/fold0 runs/grocery-cv/fold1 runs/grocery-cv/fold2 \
        --baseline efficientnet_lite2 --json-out runs/grocery-cv/cv.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from snapshop.data.readers import read_dataset
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import cross_validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="dataset the folds were cut from (as for `prepare`)")
    parser.add_argument("--fold-models", nargs="+", required=True, help="one model dir per fold")
    parser.add_argument("--baseline", action="append", default=[], help="model for every fold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--keep-roles", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--catalog-where", default="domain=iconic", help="catalog images")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if len(args.fold_models) < 2:
        parser.error("--fold-models needs one directory per fold (at least 2)")
    result = cross_validate(
        read_dataset(args.dataset),
        args.fold_models,
        args.baseline,
        seed=args.seed,
        max_images=args.max_images,
        keep_roles=args.keep_roles,
        catalog_where=args.catalog_where,
    )
    print("\n".join(result.markdown()))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SnapshopError as exc:  # a bad CSV, model or image: one line, no traceback
        sys.exit(f"error: {exc}")
