"""Shared by the scripts that score fold models on grocery-dev's held-out folds (the folds of
``snapshop prepare --folds 3`` seed 0, as grocery_cv.py): their arguments, the folds, and the
cross-fitted choice of a lever's setting (each fold scored with the setting chosen on the other
folds' queries, never with one it chose). Not a benchmark itself."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from snapshop.data.manifest import ManifestRow, matches, parse_where
from snapshop.data.readers import read_dataset
from snapshop.errors import ConfigError, SnapshopError
from snapshop.evaluate.crossval import PooledRanks, held_out_folds

PROTOCOLS = ("photo -> catalog", "photo -> all")
S = TypeVar("S")
S_contra = TypeVar("S_contra", contravariant=True)
Ranks = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]


@dataclass
class Folds:
    """Each fold's model and held-out rows, and every held-out product's global label."""

    models: list[str]
    rows: list[ManifestRow]
    held_out: list[list[ManifestRow]]
    label_of: dict[str, int]

    @property
    def packaged(self) -> set[str]:
        """The products that are branded packaged goods (the rest: fruit and vegetables)."""
        return {r.sku for r in self.rows if r.extra.get("is_packaged_sku") == "1"}


def fold_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that score fold models on grocery_cv.py's folds."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--fold-models", nargs="+", help="one model dir per fold")
    parser.add_argument("--baseline", help="one model for every fold (instead of --fold-models)")
    parser.add_argument("--folds", type=int, default=3, help="with --baseline")
    parser.add_argument("--catalog-where", default="domain=iconic")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_folds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Folds:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if bool(args.fold_models) == bool(args.baseline):
        parser.error("give --fold-models or --baseline")
    models = args.fold_models or [args.baseline] * args.folds
    rows = read_dataset(args.dataset)
    held_out = checked_folds(held_out_folds(rows, len(models), seed=args.seed), args.catalog_where)
    label_of = {p: i for i, p in enumerate(sorted({r.sku for f in held_out for r in f}))}
    return Folds(models, rows, held_out, label_of)


def checked_folds(held_out: list[list[ManifestRow]], catalog_where: str) -> list[list[ManifestRow]]:
    """``held_out``, once every fold holds queries, catalog images and other gallery photos
    (what the scripts rank and compare); otherwise a ConfigError naming what is missing."""
    catalog = parse_where([catalog_where])
    for i, fold in enumerate(held_out):
        gallery = [r for r in fold if r.role == "gallery"]
        missing = [
            name
            for name, count in (
                ("query photos", sum(r.role == "query" for r in fold)),
                (f"catalog images ({catalog_where})", sum(matches(r, catalog) for r in gallery)),
                ("gallery photos", sum(not matches(r, catalog) for r in gallery)),
            )
            if not count
        ]
        if missing:
            raise ConfigError(f"fold {i} holds no {' and no '.join(missing)}")
    return held_out


def best_setting(settings: Sequence[S], hits: Callable[[S], int]) -> S:
    """The setting with the most R@1 hits; ties go to the earlier one (list the preferred
    settings first)."""
    return max(settings, key=hits)  # max keeps the first of equals


class FoldScores(Protocol[S_contra]):
    """One fold and protocol of a lever: its queries, ranked under a setting of the lever."""

    queries: list[ManifestRow]

    def ranks(self, setting: S_contra, label_of: dict[str, int]) -> Ranks: ...


def hits_on(folds: Sequence[FoldScores[S]], label_of: dict[str, int]) -> Callable[[S], int]:
    """A setting -> its R@1 hits summed over ``folds``."""
    return lambda setting: sum(int((f.ranks(setting, label_of)[0] < 1).sum()) for f in folds)


@dataclass
class Column(Generic[S]):
    """A column of the table: its name, and the setting it picks given the other folds."""

    name: str
    pick: Callable[[Sequence[Any]], S]  # the other folds' scores -> the setting
    describe: Callable[[S], str] = str  # "": the pick is not printed


def baseline(name: str, setting: S) -> Column[S]:
    """The column every other one is paired with: one fixed setting."""
    return Column(name, lambda _: setting, lambda _: "")


def cross_fitted(
    scores: Mapping[str, Sequence[FoldScores[S]]], columns: Sequence[Column[S]], folds: Folds
) -> dict[str, dict[str, PooledRanks]]:
    """Pooled ranks per column and protocol, each fold ranked under its column's pick on the
    other folds. Prints each pick and every column's R@1 by category (packaged vs produce)."""
    packaged = folds.packaged
    results: dict[str, dict[str, PooledRanks]] = {c.name: {} for c in columns}
    for protocol, fold_scores in scores.items():
        for column in columns:
            pooled, tally = PooledRanks(), {"packaged": [0, 0], "produce": [0, 0]}
            for i, fold in enumerate(fold_scores):
                setting = column.pick([f for j, f in enumerate(fold_scores) if j != i])
                if text := column.describe(setting):
                    print(f"{protocol}, {column.name}, fold {i}: {text}")
                ranks = fold.ranks(setting, folds.label_of)
                pooled.add(*ranks)
                for row, rank in zip(fold.queries, ranks[0], strict=True):
                    category = tally["packaged" if row.sku in packaged else "produce"]
                    category[0] += 1
                    category[1] += int(rank < 1)
            results[column.name][protocol] = pooled
            cells = ", ".join(f"{name} {h / n:.3f} ({n})" for name, (n, h) in tally.items() if n)
            print(f"{protocol}, {column.name}: R@1 by category {cells}")
    return results


def run(main: Callable[[], int]) -> NoReturn:
    """A script's entry point: a bad CSV, model or image ends it with one line and status 2."""
    try:
        sys.exit(main())
    except SnapshopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
