"""Similar-products export: for every product, its k most similar products by product vector.

The feed a shop's recommendation system reads nightly. Products are taken in id order in
batches; each batch is one search of the product index (``snapshop.product_vectors``), and
its rows go straight to the output file, so memory holds the product vectors and one batch.

Resumable: after each batch is on disk, ``OUT.progress.json`` records the last product done
and how much of the output is complete (bytes of a CSV or JSON Lines file, written to
``OUT.partial``; finished part files of a parquet export, written to ``OUT.parts/``), and
the export becomes OUT at the end, in one rename: a reader of OUT sees the last complete
feed until the next one is complete. A run that finds that file continues after the last
complete product; a finished export removes it.

A CSV is for people, who open it in a spreadsheet: a sku that starts a formula (``=``, ``+``,
``-``, ``@``, ...) is written as text, a quote in front (``snapshop.data.spreadsheet``);
``spreadsheet_safe=False`` writes skus exactly. JSON Lines (``.jsonl``, one object of
``COLUMNS`` a row) and parquet are for programs: skus always exactly.

A product whose vector is zero (its image vectors cancel, v and -v: the mean has no
direction) is like nothing: it scores 0 against every product, so it would be listed above
every product of negative similarity. It is nobody's neighbour and gets no neighbours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.catalog.catalog import Catalog
from snapshop.catalog.migrate import CATALOG_ID
from snapshop.config import atomic_file, check_int
from snapshop.data.spreadsheet import csv_text
from snapshop.errors import ConfigError
from snapshop.product_vectors import ProductVectors
from snapshop.search import check_flag, check_k

log = logging.getLogger(__name__)

COLUMNS = ("product_id", "sku", "rank", "similar_product_id", "similar_sku", "score")
FORMATS = (".csv", ".jsonl", ".parquet")
TEXT_FORMATS = ("csv", "jsonl")  # appended in place, resumed at a byte offset
# Rows (products x k) one batch may hold: a batch's rows are Python lists until written,
# ~350 bytes a row (k = 1000 with batches of 8,192 products peaked at 2.9 GB; the CLI allows
# 65,536). Batches are made smaller for a large k: ~90 MB here, the same output.
MAX_BATCH_ROWS = 262_144


@dataclass(frozen=True)
class ExportReport:
    path: str
    format: str
    k: int
    position: str | None
    products: int  # exported by this run
    rows: int  # written by this run
    resumed_after: int | None  # the last product id a previous run had finished
    seconds: float

    @property
    def products_per_second(self) -> float:
        return self.products / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "products_per_second": round(self.products_per_second, 1)}


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"{path}: the output must end in .jsonl, .csv or .parquet")
    if suffix == ".parquet" and not parquet_available():
        raise ConfigError(
            "parquet output needs pyarrow, which is not installed; write a .csv or .jsonl"
        )
    return suffix.removeprefix(".")


def neighbours(
    pv: ProductVectors,
    k: int,
    *,
    position: str | None = None,
    after: int = 0,
    batch_size: int = 1024,
) -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]]:
    """Batches of (products (B,), their k most similar products (B, k), scores (B, k)), for
    the products with id > ``after`` in id order; a product is never its own neighbour, and
    missing neighbours (fewer than k + 1 products) are -1 with score -inf. A product whose
    vector is zero has none and is none."""
    ids, vectors = pv.vectors(position)
    directionless = ids[~vectors.any(axis=1)]
    if len(directionless):
        log.warning("%d products have a zero product vector (their image vectors cancel, e.g."
                    " product %d): they get no similar products and are none",
                    len(directionless), int(directionless[0]))  # fmt: skip
    start = int(np.searchsorted(ids, after, side="right"))
    fetch = min(k + 1 + len(directionless), max(len(ids), 1))
    for lo in range(start, len(ids), batch_size):
        batch = ids[lo : lo + batch_size]
        # a refresh changes the product index in place; not held over the yield, while the
        # caller writes a batch out
        with pv.catalog.reading():
            hits = pv.index(position).search(vectors[lo : lo + batch_size], fetch)
        out_ids = np.full((len(batch), k), -1, np.int64)
        out_scores = np.full((len(batch), k), -np.inf, np.float32)
        lonely = np.isin(batch, directionless)
        like_nothing = np.isin(hits.ids, directionless)
        for row, product in enumerate(batch):
            if lonely[row]:
                continue
            keep = (hits.ids[row] != product) & (hits.ids[row] >= 0) & ~like_nothing[row]
            found, scores = hits.ids[row][keep][:k], hits.scores[row][keep][:k]
            out_ids[row, : len(found)] = found
            out_scores[row, : len(found)] = scores
        yield batch, out_ids, out_scores


class _Progress:
    """``OUT.progress.json``: the resume point, replaced atomically after every batch."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".progress.json")

    def read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            int(data["last_product_id"]), int(data["done"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{self.path}: unreadable resume point ({exc}); delete it (and the output)"
                " or pass restart to start over"
            ) from None
        return data

    def write(self, data: dict[str, Any]) -> None:
        with atomic_file(self.path, sync=True) as fh:
            fh.write(json.dumps(data).encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _fsync_write(fh: Any, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def export_similar(
    catalog: Catalog,
    out: str | os.PathLike[str],
    k: int = 20,
    *,
    position: str | None = None,
    batch_size: int = 1024,
    restart: bool = False,
    spreadsheet_safe: bool = True,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write every product's ``k`` most similar products (by product vector of the images,
    or of the crops at ``position``) to ``out`` (.csv, .jsonl, or .parquet when pyarrow is
    there):
    one row per (product, rank) with the columns of ``COLUMNS``, ranks from 1, products in id
    order. Continues an interrupted export of the same ``out`` unless ``restart``. Products
    are searched ``batch_size`` at a time, fewer when ``k`` is large (``MAX_BATCH_ROWS``).
    A CSV's skus that a spreadsheet would run as formulas are written as text (a quote in
    front) unless not ``spreadsheet_safe``."""
    k, batch_size = check_k(k), check_int("batch_size", batch_size, 1)
    spreadsheet_safe = check_flag("spreadsheet_safe", spreadsheet_safe)
    batch_size = min(batch_size, max(1, MAX_BATCH_ROWS // k))
    out = Path(out)
    fmt = output_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pv = ProductVectors(catalog)
    ids = pv.product_ids(position)
    if position is not None and position not in pv.positions():
        raise ConfigError(
            f"no product has garment crops at position {position!r}"
            f" (positions: {', '.join(pv.positions()) or 'none'})"
        )
    with _one_export_at_a_time(out):
        state = _Progress(out)
        parts = out.with_name(out.name + ".parts")
        header = {"format": fmt, "k": k, "position": position, "generation": pv.generation,
                  "spreadsheet_safe": spreadsheet_safe if fmt == "csv" else None,
                  "catalog": catalog_identity(catalog), "beside": True}  # fmt: skip
        # The rows go beside OUT, which keeps the last complete feed until they replace it (an
        # export begun before that wrote into OUT itself, and is resumed there). An OUT that is
        # a symbolic link (to the file a web server serves) keeps it: its target is replaced.
        final = out.resolve() if out.is_symlink() else out
        staging = final.with_name(final.name + ".partial")
        resume = None if restart else _resume_point(state, out, staging, parts, header)
        if resume is None:  # a fresh start: nothing of an earlier run is kept
            after, done = 0, _start_output(staging, parts, fmt)
            state.write({**header, "last_product_id": 0, "done": done})
        else:
            after, done = int(resume["last_product_id"]), int(resume["done"])
            staging = staging if resume.get("beside") else out
        if progress_total:
            progress_total(len(ids))
        if progress:
            progress(int(np.searchsorted(ids, after, side="right")))

        sku_of: dict[int, str] = {}
        exported = rows = 0
        with _RowSink(staging, parts, fmt, done, spreadsheet_safe) as sink:
            for batch, found, scores in neighbours(
                pv, k, position=position, after=after, batch_size=batch_size
            ):
                missing = {int(i) for i in np.concatenate([batch, found.ravel()])
                           if i >= 0 and int(i) not in sku_of}  # fmt: skip
                sku_of.update(
                    {i: p.sku for i, p in catalog.store.products_by_ids(sorted(missing)).items()}
                )
                table = _rows(batch, found, scores, sku_of)
                done = sink.write(table)
                state.write({**header, "last_product_id": int(batch[-1]), "done": done})
                exported += sum(int(i) in sku_of for i in batch)
                rows += len(table["product_id"])
                if progress:
                    progress(len(batch))
        # The resume point goes before the parts and after the join (a crash in between: the
        # rerun joins again), but before the rename (a crash in between: the rerun starts over,
        # where it would find its resume point's file gone).
        if fmt == "parquet":
            _join_parts(parts, done, final)
            state.clear()
            _clear_parts(parts)
        else:
            state.clear()
            if staging != out:
                staging.replace(final)
        report = ExportReport(str(out), fmt, k, position, exported, rows,
                              after if resume else None, time.perf_counter() - t0)  # fmt: skip
        log.info("exported %d products (%d rows) to %s", exported, rows, out)
        return report


@contextlib.contextmanager
def _one_export_at_a_time(out: Path) -> Iterator[None]:
    """Held while an export writes ``out``: ``OUT.lock``'s ``flock`` (the small file is left
    there). A second run meanwhile (a cron overlap) would resume the first one's file while
    it is written: refused instead."""
    import fcntl

    fd = os.open(out.with_name(out.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{out}: another export into this file is running; wait for it to end"
            ) from None
        yield
    finally:
        os.close(fd)


def _resume_point(
    state: _Progress, out: Path, staging: Path, parts: Path, header: dict[str, Any]
) -> dict[str, Any] | None:
    """The unfinished export's resume point, checked against this run's settings and against
    the output it left; None when there is none."""
    resume = state.read()
    if resume is None:
        return None
    if "spreadsheet_safe" not in resume:  # begun before cells were escaped: a raw CSV
        resume["spreadsheet_safe"] = False if resume.get("format") == "csv" else None
    settings = {key: header[key] for key in ("format", "k", "position", "spreadsheet_safe")}
    previous = {key: resume.get(key) for key in settings}
    if previous != settings:
        raise ConfigError(
            f"{out}: an unfinished export with {previous} is here, not {settings};"
            " pass restart to start over"
        )
    catalog = resume.get("catalog")
    if catalog is not None and catalog != header["catalog"]:  # None: begun before it was kept
        raise ConfigError(
            f"{out}: an unfinished export of another catalog ({catalog}) is here, not of"
            f" {header['catalog']}; pass restart to start over"
        )
    generation = resume.get("generation")
    if isinstance(generation, int) and generation > header["generation"]:
        raise ConfigError(
            f"{out}: an unfinished export began at catalog generation {generation}, and the"
            f" catalog is at {header['generation']} now (restored from a backup, or made"
            " again?); pass restart to start over"
        )
    if generation != header["generation"]:
        log.warning("%s: the catalog changed since this export began; products exported"
                    " before the resume reflect the older catalog", out)  # fmt: skip
    written = staging if resume.get("beside") else out
    _check_resume_point(written, parts, settings["format"], int(resume["done"]))
    return resume


def catalog_identity(catalog: Catalog) -> dict[str, Any]:
    """What tells a catalog from another made at the same place: its location, when its card
    was made, and the id migrate gives it and its copies."""
    location = catalog.location if catalog.is_server else str(Path(catalog.location).resolve())
    return {"location": location, "created_at": catalog.card.created_at,
            "catalog_id": catalog.card.extra.get(CATALOG_ID)}  # fmt: skip


def _start_output(out: Path, parts: Path, fmt: str) -> int:
    """Start an empty output (a CSV holds its header); returns its resume offset."""
    _clear_parts(parts)
    if fmt not in TEXT_FORMATS:
        return 0
    with open(out, "wb") as fh:
        _fsync_write(fh, csv_text([COLUMNS]).encode() if fmt == "csv" else b"")
        return fh.tell()


def _clear_parts(parts: Path) -> None:
    """Remove the part files an export wrote to ``parts`` and, when nothing else is left
    there, the folder: a folder of that name holding other files is not the export's."""
    if not parts.is_dir() or parts.is_symlink():
        return
    for name in ("part-*.parquet", "part-*.tmp"):
        for part in parts.glob(name):
            part.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: left as it is
        parts.rmdir()


class _RowSink:
    """Where the rows go: appended to the CSV or JSON Lines file in place (resume offset: its
    length in bytes), or one parquet part file per batch (resume offset: the number of
    parts)."""

    def __init__(self, out: Path, parts: Path, fmt: str, done: int, spreadsheet_safe: bool) -> None:
        self.parts, self.done, self.fmt = parts, done, fmt
        self.spreadsheet_safe = spreadsheet_safe
        self.text_file: Any = None
        if fmt in TEXT_FORMATS:
            self.text_file = open(out, "r+b")  # noqa: SIM115 (closed by __exit__)
            self.text_file.truncate(done)  # rows after the resume point may be partial: dropped
            self.text_file.seek(done)
        else:
            parts.mkdir(exist_ok=True)
            for stray in parts.glob("*.tmp"):
                stray.unlink()

    def write(self, table: dict[str, Any]) -> int:
        if self.text_file is not None:
            rows = zip(*table.values(), strict=True)
            if self.fmt == "csv":
                text = csv_text(rows, spreadsheet_safe=self.spreadsheet_safe)
            else:
                text = "".join(
                    json.dumps(dict(zip(COLUMNS, row, strict=True)), ensure_ascii=False) + "\n"
                    for row in rows
                )
            _fsync_write(self.text_file, text.encode())
            self.done = self.text_file.tell()
        else:
            _write_part(self.parts / f"part-{self.done:06d}.parquet", table)
            self.done += 1
        return self.done

    def __enter__(self) -> _RowSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.text_file is not None:
            self.text_file.close()


def _check_resume_point(out: Path, parts: Path, fmt: str, done: int) -> None:
    """The output an unfinished export left must hold what its resume point says."""
    if fmt in TEXT_FORMATS:
        complete = out.is_file() and out.stat().st_size >= done
    else:
        complete = all((parts / f"part-{n:06d}.parquet").is_file() for n in range(done))
    if not complete:
        raise ConfigError(
            f"{out}: the output of the unfinished export is missing or shorter than its resume"
            " point; pass restart to start over"
        )


def _rows(
    batch: NDArray[np.int64],
    found: NDArray[np.int64],
    scores: NDArray[np.float32],
    sku_of: dict[int, str],
) -> dict[str, list[Any]]:
    table: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for product, neighbours_, product_scores in zip(batch, found, scores, strict=True):
        if int(product) not in sku_of:  # deleted since the export read the product vectors
            continue
        for rank, (other, score) in enumerate(zip(neighbours_, product_scores, strict=True), 1):
            if other < 0 or int(other) not in sku_of:  # none left, or deleted meanwhile
                continue
            table["product_id"].append(int(product))
            table["sku"].append(sku_of[int(product)])
            table["rank"].append(rank)
            table["similar_product_id"].append(int(other))
            table["similar_sku"].append(sku_of[int(other)])
            table["score"].append(round(float(score), 6))
    return table


def _write_part(path: Path, table: dict[str, list[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(table, schema=_schema()), tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("product_id", pa.int64()), ("sku", pa.string()), ("rank", pa.int32()),
                      ("similar_product_id", pa.int64()), ("similar_sku", pa.string()),
                      ("score", pa.float32())])  # fmt: skip


def _join_parts(parts: Path, count: int, out: Path) -> None:
    """Stream the ``count`` finished part files, in order, into one parquet file ``out``."""
    import pyarrow.parquet as pq

    tmp = out.with_name(out.name + ".tmp")
    with pq.ParquetWriter(tmp, _schema()) as writer:
        for n in range(count):
            writer.write_table(pq.read_table(parts / f"part-{n:06d}.parquet"))
    tmp.replace(out)
