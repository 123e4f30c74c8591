"""A catalog checked end to end against its store: ``snapshop catalog check``.

The store (SQLite or PostgreSQL) is the source of truth; everything else is derived from it
and trusted on open as far as a cheap check allows: a flat index file by its CRC-32, a
compressed index's float vectors (``.vectors.npy``) by a sampled fingerprint only, the
product-vector cache by its shape, a blob by its name. This reads all of it and compares it
with the store, for an operator who suspects a disk, a copy or a restore:

- every saved index file loads, and holds, for every entry it shares with the store, the
  store's vector (entries the store gained or lost since its last save are reported, not
  counted as damage: an open catches up with them);
- every index the catalog searches finds a sample of its own entries (self-recall@10);
- the stored vectors are finite;
- the product vectors (of the cache, reconciled as a search would use them) are the mean of
  their entries' stored vectors;
- no two products hold one sku in two Unicode forms (a store written before skus were
  normalised may);
- every blob file exists and its bytes have the sha256 its image rows name (directory
  catalogs; ``blobs=False`` skips reading them).

Nothing is changed. Each problem says how to repair it (``catalog reindex`` rebuilds the
indexes from the store; the product-vector cache is recomputed once removed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.blobs import blob_file
from snapshop.catalog.catalog import IMAGES, Catalog, index_name
from snapshop.config import check_int
from snapshop.errors import CatalogError, VectorIndexError
from snapshop.index.factory import load_index
from snapshop.models.card import sha256_file
from snapshop.models.embedder import unit_rows
from snapshop.product_vectors import CACHE_FILE, ProductVectors

log = logging.getLogger(__name__)

VECTOR_TOLERANCE = 1e-6  # an index holds the store's float32 vectors as they are
POOL_TOLERANCE = 1e-4  # a product vector is a float64 mean, renormalised, kept as float32
SELF_RECALL_K = 10
SELF_RECALL_MIN = 0.9  # an approximate index finds nearly all its own entries in its top 10
CHECK_TRIES = 3  # checks of a catalog being written, each brought up to date first
HEX = "0123456789abcdef"


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: what (``index``, ``vectors``, ``product-vectors``, ``blob``),
    where (an index or file name, an image), what is wrong, and how to repair it."""

    what: str
    where: str
    detail: str
    fix: str


@dataclass
class CheckReport:
    catalog: str
    checked: dict[str, int] = field(default_factory=dict)  # what was read and compared
    self_recall: dict[str, float] = field(default_factory=dict)  # index name -> recall@10
    notes: list[str] = field(default_factory=list)  # not damage: e.g. a file behind the store
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, key: str, n: int = 1) -> None:
        self.checked[key] = self.checked.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_catalog(
    catalog: Catalog,
    *,
    blobs: bool = True,
    sample: int = 200,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check ``catalog`` against its store (see the module); ``sample``: entries per index
    searched for themselves (0: none). Reads everything once and changes nothing; holds one
    group's stored vectors and one index file's at a time (2 GiB each at 1M x 512). A check
    that found problems while another process wrote is done again, brought up to date
    (:data:`CHECK_TRIES` in all): a write landing is no damage."""
    sample = check_int("sample", sample, 0)
    say = progress or (lambda _stage: None)
    for _ in range(CHECK_TRIES):
        generation = catalog.store.generation
        report = _check_once(catalog, blobs, sample, say)
        if report.ok or catalog.store.generation == generation:
            return report
        say("the catalog was written during the check: again, brought up to date")
        catalog.refresh()
    report.notes.append(
        f"the catalog was written during each of {CHECK_TRIES} checks: a problem found while"
        " it changed may be a write landing; check again when writes pause"
    )
    return report


def _check_once(
    catalog: Catalog, blobs: bool, sample: int, say: Callable[[str], None]
) -> CheckReport:
    report = CheckReport(catalog.location)
    names = [IMAGES] + [index_name(p) for p in catalog.store.crop_positions()]
    say("product vectors, reconciled")
    pv = ProductVectors(catalog, save=False)  # reconciled with the store, as search uses them
    for name in names:
        say(f"vectors of {name}")
        stored = _stored_vectors(catalog, name, report)
        if not catalog.is_server:
            say(f"index file of {name}")
            _check_index_file(catalog, name, stored, report)
        if sample:
            say(f"self-recall of {name}")
            _check_self_recall(catalog, name, stored, sample, report)
        say(f"product vectors of {name}")
        _check_product_vectors(catalog, pv, name, stored, report)
    say("skus")
    _check_sku_forms(catalog, report)
    if blobs and not catalog.is_server:
        say("blobs")
        _check_blobs(catalog, report)
    elif blobs:
        report.notes.append("blobs: a server catalog keeps thumbnails only; not checked")
    return report


class _Stored:
    """A group's stored vectors: sorted ids and their rows (finite ones only; ``damaged``:
    the ids of the others, which every index and search leaves out)."""

    def __init__(
        self, ids: NDArray[np.int64], vectors: NDArray[np.float32], damaged: list[int]
    ) -> None:
        order = np.argsort(ids)
        self.ids, self.vectors = ids[order], vectors[order]
        self.damaged = np.array(sorted(damaged), np.int64)

    def rows_of(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.bool_], NDArray[np.intp]]:
        """(found (len(ids),), their rows among the found)."""
        at = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        found = self.ids[at] == ids if len(self.ids) else np.zeros(len(ids), bool)
        return found, at[found]


def _stored_vectors(catalog: Catalog, name: str, report: CheckReport) -> _Stored:
    table = "images" if name == IMAGES else "crops"
    position = None if name == IMAGES else name.removeprefix("crops-")
    ids, rows = [], []
    bad: list[int] = []
    for batch_ids, vecs in catalog.store.iter_vectors(table, catalog.dim, position=position,
                                                      batch=8192, damaged=True):  # fmt: skip
        finite = np.isfinite(vecs).all(axis=1)
        bad += batch_ids[~finite].tolist()
        ids.append(batch_ids[finite])
        rows.append(np.array(vecs[finite], np.float32))
    report.count(f"{table[:-1]} vectors", sum(len(i) for i in ids) + len(bad))
    if bad:
        report.problems.append(Problem(
            "vectors", name, f"{len(bad)} stored vectors are not finite (NaN or inf), e.g."
            f" {table[:-1]} {bad[0]}: left out of every index and search",
            "remove those images and index their sources again",
        ))  # fmt: skip
    if not ids:
        return _Stored(np.zeros(0, np.int64), np.zeros((0, catalog.dim), np.float32), bad)
    return _Stored(np.concatenate(ids), np.concatenate(rows), bad)


def _check_index_file(catalog: Catalog, name: str, stored: _Stored, report: CheckReport) -> None:
    reindex = f"snapshop catalog reindex -c {catalog.location}"
    try:
        path = catalog.index_path(name)
    except CatalogError:  # a position that cannot name a file: indexed in memory only
        report.notes.append(f"{name}: indexed in memory only (its position names no file)")
        return
    if not path.exists():
        report.notes.append(f"{name}: no saved index file (built from the store on open)")
        return
    try:
        index, _card = load_index(path)
    except VectorIndexError as exc:
        report.problems.append(Problem("index", path.name, str(exc), reindex))
        return
    try:
        ids = index.ids()
        vectors = getattr(index, "vectors", None)
        held = vectors() if callable(vectors) else None
    finally:
        close = getattr(index, "close", None)
        if callable(close):
            close()
    report.count("index entries compared", len(ids))
    behind = np.setdiff1d(stored.ids, ids)
    removed = np.setdiff1d(np.setdiff1d(ids, stored.ids), stored.damaged)
    if len(behind) or len(removed):
        report.notes.append(
            f"{path.name}: {len(behind)} of the store's entries are not in the saved file, and"
            f" {len(removed)} of the file's not in the store (a write since the file was saved,"
            " or during this check; an open catches up)"
        )
    if held is None:
        return
    found, rows = stored.rows_of(ids)
    if not found.any():
        return
    differ = np.abs(held[found] - stored.vectors[rows]).max(axis=1) > VECTOR_TOLERANCE
    if differ.any():
        first = int(ids[found][differ][0])
        report.problems.append(Problem(
            "index", path.name, f"holds other vectors than the store for {int(differ.sum())}"
            f" of {int(found.sum())} entries (e.g. {first}): the file is damaged", reindex,
        ))  # fmt: skip


def _check_self_recall(
    catalog: Catalog, name: str, stored: _Stored, sample: int, report: CheckReport
) -> None:
    nonzero = np.flatnonzero(stored.vectors.any(axis=1))
    if len(nonzero) == 0:
        return
    rng = np.random.default_rng(0)
    picked = rng.choice(nonzero, size=min(sample, len(nonzero)), replace=False)
    position = None if name == IMAGES else name.removeprefix("crops-")
    with catalog.reading():
        index = catalog.index(position)
        if index is None:
            return
        k = min(SELF_RECALL_K, len(index))
        hits = index.search(stored.vectors[picked], k)
    own = stored.ids[picked]
    found = (hits.ids == own[:, None]).any(axis=1)
    # an entry with a twin (the same image in two products) may be beaten to the top by it
    twins = hits.scores[:, -1] >= 1.0 - 1e-5 if k == SELF_RECALL_K else np.zeros(len(own), bool)
    recall = float((found | twins).mean())
    report.self_recall[name] = round(recall, 4)
    report.count("self-recall queries", len(picked))
    if recall < SELF_RECALL_MIN:
        missed = int(own[~(found | twins)][0])
        report.problems.append(Problem(
            "index", name, f"finds {recall:.0%} of {len(picked)} of its own entries in its top"
            f" {k} (e.g. not {missed}): the index is damaged or badly tuned",
            f"snapshop catalog reindex -c {catalog.location}",
        ))  # fmt: skip


def _check_product_vectors(
    catalog: Catalog, pv: ProductVectors, name: str, stored: _Stored, report: CheckReport
) -> None:
    position = None if name == IMAGES else name.removeprefix("crops-")
    products, vectors = pv.vectors(position)
    entries, entry_owner = catalog.store.entry_owners(position)
    at = np.minimum(np.searchsorted(entries, stored.ids), max(len(entries) - 1, 0))
    keep = entries[at] == stored.ids if len(entries) else np.zeros(len(stored.ids), bool)
    owners = entry_owner[at[keep]]
    order = np.argsort(owners, kind="stable")
    expected_ids, starts = np.unique(owners[order], return_index=True)
    rows = unit_rows(stored.vectors[np.flatnonzero(keep)[order]])
    sums = np.add.reduceat(rows, starts, axis=0) if len(rows) else rows
    expected = unit_rows(sums)
    report.count("product vectors compared", len(products))
    fix = f"remove {Path(catalog.location) / 'index' / CACHE_FILE} (recomputed on open)"
    if not np.array_equal(products, expected_ids):
        extra = np.setdiff1d(products, expected_ids)
        lacking = np.setdiff1d(expected_ids, products)
        report.problems.append(Problem(
            "product-vectors", name, f"products {extra[:3].tolist()} have a vector but no"
            f" entry, {lacking[:3].tolist()} entries but no vector", fix,
        ))  # fmt: skip
        return
    differ = np.abs(vectors - expected).max(axis=1) > POOL_TOLERANCE if len(products) else []
    if np.any(differ):
        report.problems.append(Problem(
            "product-vectors", name, f"{int(np.sum(differ))} product vectors are not the mean"
            f" of their entries (e.g. product {int(products[differ][0])})", fix,
        ))  # fmt: skip


def _check_sku_forms(catalog: Catalog, report: CheckReport) -> None:
    """Products whose skus differ only in form: a lookup finds one of them only, and a copy
    of the catalog would merge them (``catalog migrate`` refuses such a source)."""
    twins = catalog.sku_twins()
    if twins:
        key, ids = next(iter(twins.items()))
        report.problems.append(Problem(
            "sku", repr(key), f"{len(twins)} skus are held by two or more products in other"
            f" Unicode forms (e.g. products {ids}); lookups find one of them only",
            f"remove the other (snapshop catalog remove --id {ids[-1]} -c"
            f" {catalog.location}) and index its images again under the sku",
        ))  # fmt: skip


def _check_blobs(catalog: Catalog, report: CheckReport) -> None:
    directory = Path(catalog.location)
    missing, damaged, foreign = [], [], 0
    for a in HEX:
        for b in HEX:
            for sha256, relative in catalog.store.blob_refs_with_prefix(a + b):
                if relative is None:
                    continue  # indexed in place, without a copy
                path = blob_file(directory, relative, sha256)
                if path is None:
                    foreign += 1
                    continue
                report.count("blobs read")
                try:
                    digest = sha256_file(path)
                except FileNotFoundError:
                    missing.append(relative)
                    continue
                except OSError as exc:
                    missing.append(f"{relative} ({exc.strerror})")
                    continue
                if digest != sha256:
                    damaged.append(relative)
    fix = "index the products' sources again (the rows stay; a rerun writes the file again)"
    if missing:
        report.problems.append(Problem(
            "blob", missing[0], f"{len(missing)} blob files that images name are missing or"
            " unreadable: their thumbnails and local features cannot be made", fix,
        ))  # fmt: skip
    if damaged:
        report.problems.append(Problem(
            "blob", damaged[0], f"{len(damaged)} blob files do not hold the bytes their name"
            " says (sha256 differs): damaged on disk", fix,
        ))  # fmt: skip
    if foreign:
        report.notes.append(f"blobs: {foreign} rows name a file outside the blob layout; not read")
