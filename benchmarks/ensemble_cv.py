"""An ensemble of fold-model sets on grocery-dev's held-out folds (issue #20): the members'
L2-normalised vectors concatenated and scaled by 1/sqrt(n), so that the ensemble's cosine is
the mean of the members' cosines.

Each ``--fold-models`` set is one member (one model directory per fold, in fold order, as
grocery_cv.py takes them: the folds of ``snapshop prepare --folds 3`` seed 0). Columns: each
member alone, then the ensemble of all of them. R@K pooled over the folds with 95 % bootstrap
intervals over products, and each column's R@1 paired with the first member's. With
``--subsets``, every ensemble of two or more members is a column too (each fold embedded once).

    python benchmarks/ensemble_cv.py ../shared/datasets/grocery-dev/manifest.csv \
        --fold-models runs/grocery-cv/Dcd0 runs/grocery-cv/Dcd1 runs/grocery-cv/Dcd2 \
        --fold-models runs/grocery-cv/Dcds1_0 runs/grocery-cv/Dcds1_1 runs/grocery-cv/Dcds1_2
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

import numpy as np
from grocery_folds import PROTOCOLS, checked_folds, run  # benchmarks/
from numpy.typing import NDArray

from snapshop.data.manifest import ManifestRow, matches, parse_where
from snapshop.data.readers import read_dataset
from snapshop.errors import SnapshopError
from snapshop.evaluate.crossval import CrossValidation, PooledRanks, fold_ranks, held_out_folds
from snapshop.evaluate.retrieval import embed_paths
from snapshop.models.embedder import load_embedder

MAX_SUBSET_MEMBERS = 6  # 57 ensembles: a table still readable


def ensemble(members: list[NDArray[np.float32]]) -> NDArray[np.float32]:
    """(N, D_i) L2-normalised vectors per member -> (N, sum D_i), L2-normalised: the cosine of
    two such vectors is the mean of the members' cosines."""
    return (np.concatenate(members, axis=1) / np.sqrt(len(members))).astype(np.float32)


def embed_fold(model: str, rows: list[ManifestRow]) -> NDArray[np.float32]:
    vecs, kept, skipped, _ = embed_paths(load_embedder(model), [str(r.path) for r in rows])
    if skipped:
        raise SnapshopError(f"{model}: {len(skipped)} unreadable images")
    return vecs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument(
        "--fold-models",
        nargs="+",
        action="append",
        required=True,
        help="a member: one dir per fold",
    )
    parser.add_argument("--catalog-where", default="domain=iconic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--subsets", action="store_true", help="also every ensemble of 2 or more members"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    members: list[list[str]] = args.fold_models
    if len(members) < 2 or len({len(m) for m in members}) != 1 or len(members[0]) < 2:
        parser.error("give two or more --fold-models sets, each one directory per fold")
    if args.subsets and len(members) > MAX_SUBSET_MEMBERS:
        parser.error(
            f"--subsets takes at most {MAX_SUBSET_MEMBERS} --fold-models sets"
            f" ({2 ** len(members) - len(members) - 1} ensembles for {len(members)})"
        )
    names = [
        f"{'/'.join(Path(m).name for m in models)}" + (f" ({i + 1})" if i else "")
        for i, models in enumerate(members)
    ]  # numbered after the first: the same set may be given twice
    subsets = [
        combo
        for k in range(2, len(members) + 1)
        for combo in itertools.combinations(range(len(members)), k)
        if args.subsets or k == len(members)
    ]
    columns = [
        *names,
        *(
            "ensemble" if len(c) == len(members) else "ensemble " + "+".join(str(i + 1) for i in c)
            for c in subsets
        ),
    ]
    folds = checked_folds(
        held_out_folds(read_dataset(args.dataset), len(members[0]), seed=args.seed),
        args.catalog_where,
    )
    label_of = {p: i for i, p in enumerate(sorted({r.sku for f in folds for r in f}))}
    catalog = parse_where([args.catalog_where])
    results = {c: {p: PooledRanks() for p in PROTOCOLS} for c in columns}
    for i, rows in enumerate(folds):
        singles = [embed_fold(models[i], rows) for models in members]
        vectors = [*singles, *(ensemble([singles[j] for j in c]) for c in subsets)]
        queries = [j for j, r in enumerate(rows) if r.role == "query"]
        gallery = [j for j, r in enumerate(rows) if r.role == "gallery"]
        shown = {
            "photo -> catalog": [j for j in gallery if matches(rows[j], catalog)],
            "photo -> all": gallery,
        }
        for column, v in zip(columns, vectors, strict=True):
            for protocol, g in shown.items():
                results[column][protocol].add(
                    *fold_ranks(
                        v[queries], [rows[j].sku for j in queries],
                        v[g], [rows[j].sku for j in g], label_of,
                    )
                )  # fmt: skip
    print("\n".join(CrossValidation(len(folds), columns, results, names[0]).markdown()))
    return 0


if __name__ == "__main__":
    run(main)
