"""Cross-validated retrieval on unseen products: each fold's model scored on its own held-out
products, the ranks pooled over the folds, so every product of the dataset counts as unseen.

The folds are the protocol's (``snapshop prepare --folds K --fold N``, same seed and options
as the training side, benchmarks/metric_learning_cv_gpu.sh). Both protocols of grocery-dev:
photo -> the fold's whole held-out gallery, and photo -> the fold's catalog images only
(``--catalog-where``). Columns: each ``--baseline`` model (the same for every fold, embedded
once) and the fold models (``--fold-models``, one directory per fold, in fold order; repeat the
option to compare recipes, each column named by its directories). R@K with a 95 % bootstrap
interval over products (all photos of a product resampled together), image-level R@5 / R@10
(one of the top K *images* is of the product; every K in the JSON), and each column's R@1
minus the first ``--fold-models`` column's, paired over products.
The scoring is :func:`snapshop.evaluate.crossval.cross_validate`; this script prints its tables.

    python benchmarks/grocery_cv.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/fold0 runs/grocery-cv/fold1 runs/grocery-cv/fold2 \
        --baseline efficientnet_lite2 --json-out runs/grocery-cv/cv.json
    python benchmarks/grocery_cv.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/D0 runs/grocery-cv/D1 runs/grocery-cv/D2 \
        --fold-models runs/grocery-cv/Dcd0 runs/grocery-cv/Dcd1 runs/grocery-cv/Dcd2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from snapshop.data.readers import read_dataset
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import FOLD_MODELS, cross_validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="dataset the folds were cut from (as for `prepare`)")
    parser.add_argument(
        "--fold-models",
        nargs="+",
        action="append",
        required=True,
        help="one model dir per fold (repeat to compare recipes)",
    )
    parser.add_argument("--baseline", action="append", default=[], help="model for every fold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-images", type=int, default=2, help="as `snapshop prepare` had")
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--keep-roles", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--catalog-where", default="domain=iconic", help="catalog images")
    parser.add_argument(
        "--catalog-known",
        action="store_true",
        help="the protocol where fold models trained on the held-out products' catalog images"
        " too (a shop's whole catalog), checked against each model's training manifest",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if any(len(models) < 2 for models in args.fold_models):
        parser.error("--fold-models needs one directory per fold (at least 2)")
    if len(args.fold_models) == 1:
        trained = {FOLD_MODELS: args.fold_models[0]}
    else:
        trained = {"/".join(Path(m).name for m in models): models for models in args.fold_models}
        if len(trained) < len(args.fold_models):
            parser.error("two --fold-models sets with the same directory names")
    result = cross_validate(
        read_dataset(args.dataset),
        trained,
        args.baseline,
        seed=args.seed,
        min_images=args.min_images,
        max_images=args.max_images,
        keep_roles=args.keep_roles,
        catalog_where=args.catalog_where,
        catalog_known=args.catalog_known,
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
