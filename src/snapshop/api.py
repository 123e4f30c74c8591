"""The Python API: typed functions the CLI and the service are thin shells over."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from snapshop import integrity
from snapshop.catalog.blobs import DEFAULT_GRACE_SECONDS, GcReport
from snapshop.catalog.card import read_card, write_card
from snapshop.catalog.catalog import (
    CARD_FILE,
    Catalog,
    catalog_exists,
    check_index_kind,
    create_catalog,
    open_catalog,
)
from snapshop.catalog.server import is_server_target
from snapshop.data.sources import CatalogRecord, read_source
from snapshop.detect.base import Detector
from snapshop.detect.factory import create_detector
from snapshop.errors import (
    CatalogError,
    CatalogStorageError,
    ConfigError,
    ManifestError,
    NotFoundError,
)
from snapshop.images import ImageSource
from snapshop.index.choose import AUTO
from snapshop.index.factory import INDEX_KINDS
from snapshop.ingest import Ingestor, IngestReport, discard_empty_catalog
from snapshop.ingest_ray import RayConfig, import_ray
from snapshop.models.embedder import Embedder, load_embedder
from snapshop.models.tta import check_view_count
from snapshop.search import (
    DEFAULT_RANKING,
    ProductFilter,
    Searcher,
    SearchResult,
    check_flag,
    check_int,
    check_number,
    check_ranking,
)
from snapshop.verify import VerifyConfig

PathLike = str | os.PathLike[str]

log = logging.getLogger(__name__)


def open_or_create_catalog(
    catalog_dir: PathLike, embedder: Embedder, model_ref: str, index_kind: str = "flat"
) -> Catalog:
    """``catalog_dir``: a directory, or a PostgreSQL URI (``postgresql://…``)."""
    if catalog_exists(catalog_dir):
        return open_catalog(catalog_dir)
    return create_catalog(
        catalog_dir, model_id=embedder.model_id, model_ref=model_ref, dim=embedder.dim,
        index_kind=index_kind,
    )  # fmt: skip


def _model_ref(model: str | None) -> str:
    if model is None:
        return "efficientnet_lite2"
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def catalog_embedder(
    catalog: Catalog, model: str | None = None, *, threads: int | None = None
) -> Embedder:
    """The embedder a catalog was built with (or ``model``, which must match it);
    ``threads``: ONNX Runtime intra-op threads (None: its default)."""
    embedder = load_embedder(model or catalog.model_ref, threads=threads)
    catalog.check_model(embedder.model_id)
    return embedder


def catalog_detector(catalog: Catalog, detector: str | Detector | None = None) -> Detector | None:
    """``detector`` (a spec such as ``"none"`` or ``"segmenter"``, or an instance), or when
    None the one the catalog's crops came from (issue #4)."""
    if detector is not None and not isinstance(detector, str):
        return detector
    return create_detector(detector if detector is not None else catalog.detector)


def index_source(
    source: PathLike | list[CatalogRecord],
    catalog_dir: PathLike,
    *,
    model: str | None = None,
    detector: str | Detector | None = None,
    batch_size: int = 32,
    sync: bool = False,
    index_kind: str | None = None,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    ray: RayConfig | None = None,
    catalog_views: int | None = None,
) -> IngestReport:
    """Ingest a folder or CSV manifest into ``catalog_dir`` (created on first use).

    ``index_kind``: ``auto`` (the default for new catalogs: exact search while it meets the
    latency budget, HNSW above), ``flat``, ``hnsw``, ``pgvector``, ``milvus``; given for an
    existing catalog it replaces the card's choice (indexes are rebuilt from the store).
    ``workers``: decode processes (None: one per core; 0: in-process). ``ray``: decode,
    detect and embed on Ray Data instead (:mod:`snapshop.ingest_ray`; ``workers`` unused),
    written here through the same batches. ``catalog_views`` (issue #20): a packshot's
    vector is the mean of the image, its mirror and this many augmented views (0: off); it
    is recorded in the catalog's card, which every later ingest follows (None: the card's
    setting, off for a new catalog), and a catalog holding images refuses a different one
    (ConfigError, nothing written).
    A source with no image raises ManifestError before anything is written, and a catalog
    this call created is removed again if nothing was indexed into it. Files a folder holds
    that are not supported images come back in the report's ``ignored``.
    """
    if ray is not None:
        import_ray()  # a missing extra stops here, before any catalog is touched
    ignored: list[tuple[str, str]] = []
    records = source if isinstance(source, list) else read_source(Path(source), ignored)
    if not records:
        shown = "".join(f"; {path}: {reason}" for path, reason in ignored[:5])
        where = "the records given" if isinstance(source, list) else str(source)
        raise ManifestError(f"{where}: no image to index{shown}")
    server = is_server_target(catalog_dir)
    directory = Path(catalog_dir) if not server else None
    existed = directory is None or directory.exists()
    if catalog_views is not None:
        check_view_count(catalog_views)  # before a catalog is created
    catalog, embedder, created = _open_for_ingest(catalog_dir, model, index_kind)
    try:
        with catalog:
            det = catalog_detector(catalog, detector)
            # checks its settings: a refused one leaves the card as it was
            ingestor = Ingestor(catalog, embedder, det, batch_size=batch_size, workers=workers)
            if catalog_views is not None:
                catalog.record_catalog_views(catalog_views)
            if detector is not None:
                catalog.record_detector(detector if isinstance(detector, str) else detector.name)
            if progress_total:
                progress_total(len(records))
            if ray is None:
                report = ingestor.ingest(records, progress=progress, sync=sync)
            else:
                from snapshop.ingest_ray import ingest_on_ray

                spec = catalog.detector if detector is None else detector
                report = ingest_on_ray(
                    ingestor, records, ray, detector=spec, progress=progress, sync=sync
                )
    except BaseException:
        if created and directory is not None:
            discard_empty_catalog(directory, remove_directory=not existed)
        raise
    if created and report.added == 0 and directory is not None:  # nothing indexed: a new
        discard_empty_catalog(directory, remove_directory=not existed)  # catalog is not kept
    report.ignored = ignored
    return report


def _open_for_ingest(
    target: PathLike, model: str | None, index_kind: str | None
) -> tuple[Catalog, Embedder, bool]:
    """The catalog at ``target`` (created when there is none: the bool says so) and the
    embedder that fits it."""
    if catalog_exists(target):
        if index_kind is not None:
            set_index_kind(target, index_kind)
        catalog = open_catalog(target)
        embedder: Embedder | None = None
    else:
        embedder = load_embedder(model)
        try:
            catalog = create_catalog(
                target, model_id=embedder.model_id, model_ref=_model_ref(model),
                dim=embedder.dim, index_kind=index_kind or AUTO,
            )  # fmt: skip
            return catalog, embedder, True
        except CatalogError:
            if not catalog_exists(target):
                raise
            catalog = open_catalog(target)  # another process created it a moment ago
    try:
        if embedder is None:
            embedder = catalog_embedder(catalog, model)
        else:
            catalog.check_model(embedder.model_id)
    except BaseException:
        catalog.close()
        raise
    return catalog, embedder, False


def set_index_kind(catalog_dir: PathLike, kind: str, params: dict[str, Any] | None = None) -> None:
    """Record ``kind`` (and ``params``) in the catalog card and rebuild the indexes of the
    new kind from the store (issue #6). A kind that cannot be made (a server that is not
    reachable, parameters it refuses) raises CatalogError and leaves the card as it was."""
    if kind != AUTO and kind not in INDEX_KINDS:
        raise CatalogError(f"unknown index kind {kind!r}; choose from auto, {sorted(INDEX_KINDS)}")
    if is_server_target(catalog_dir):  # its vectors' home is chosen when it is created
        with open_catalog(catalog_dir) as catalog:
            if kind not in (AUTO, catalog.index_kind):
                raise CatalogError(
                    f"{catalog.location} searches its vectors with {catalog.index_kind!r};"
                    f" a server catalog keeps that kind: migrate to a new catalog created"
                    f" with --index-kind {kind} to change it"
                )
        return
    path = Path(catalog_dir) / CARD_FILE
    previous = read_card(path)
    if previous.index_kind == kind and (params is None or previous.index_params == params):
        return
    card = previous.replace(index_kind=kind)
    if params is not None or previous.index_kind != kind:  # old params fit the old kind
        card = card.replace(index_params=params or {})
    check_index_kind(card.index_kind, dict(card.index_params), previous.dim)  # before the card
    write_card(path, card)
    try:
        catalog = open_catalog(catalog_dir)
    except CatalogError:
        write_card(path, previous)  # every later open would fail the same way
        raise
    with catalog:
        catalog.save_indexes()


def open_searcher(
    catalog_dir: PathLike,
    *,
    model: str | None = None,
    detector: str | Detector | None = None,
    embed_threads: int | None = None,
    ranking: str = DEFAULT_RANKING,
    flip_query: bool = False,
    verify: bool = False,
) -> Searcher:
    """A searcher over ``catalog_dir`` that owns the catalog it opened (close it with
    ``searcher.catalog.close()``); ``detector`` None means the catalog's own (``"none"``: no
    item-based results); ``embed_threads``: ONNX Runtime threads (None: its default);
    ``ranking``: image-based results by "product" vector (default) or best "image";
    ``flip_query``: image-based results from the photo's and its mirror's mean embedding
    (issue #20: photo -> catalog R@1 +0.004 in bf16, +0.012 in fp32; a second embedding
    per query, docs/benchmarks/retrieval.md); ``verify``: re-rank the image-based results' top
    candidates by spatial verification of local features (``snapshop.verify``, its default
    settings)."""
    check_ranking(ranking)
    check_flag("flip_query", flip_query)
    check_flag("verify", verify)
    catalog = open_catalog(catalog_dir)
    try:
        embedder = catalog_embedder(catalog, model, threads=embed_threads)
        detector = catalog_detector(catalog, detector)
        return Searcher(
            catalog, embedder, detector, ranking=ranking, flip_query=flip_query,
            verify=VerifyConfig() if verify else None,
        )  # fmt: skip
    except BaseException:
        catalog.close()
        raise


def search_image(
    image: ImageSource,
    catalog_dir: PathLike,
    *,
    k: int = 10,
    model: str | None = None,
    detector: str | None = None,
    filters: ProductFilter | None = None,
    ranking: str = DEFAULT_RANKING,
    flip_query: bool = False,
    verify: bool = False,
) -> SearchResult:
    searcher = open_searcher(
        catalog_dir, model=model, detector=detector, ranking=ranking, flip_query=flip_query,
        verify=verify,
    )  # fmt: skip
    with searcher.catalog:
        return searcher.search(image, k, filters=filters)


def catalog_info(catalog_dir: PathLike) -> dict[str, Any]:
    with open_catalog(catalog_dir) as catalog:
        return catalog.info()


def remove_products(
    catalog_dir: PathLike,
    skus: Sequence[str] = (),
    *,
    ids: Sequence[int] = (),
    missing_ok: bool = False,
) -> dict[str, int]:
    """Remove the products with these ``skus`` and these catalog ``ids`` (never guessed from
    one another: the sku "12" is not product 12); returns {sku: images removed}. Every key is
    resolved first: an unknown one removes nothing (a typo must not go unnoticed), unless
    ``missing_ok`` (a run cut short, run again: what it removed already is skipped); a key
    of the wrong type removes nothing either (ConfigError: a sku is text, an id an integer;
    ``skus`` is a list, never one string)."""
    if isinstance(skus, str | bytes) or not isinstance(skus, Iterable):
        raise ConfigError(f"skus must be a list of skus, not {skus!r} (one sku: [sku])")
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise ConfigError(f"ids must be a list of product ids, not {ids!r}")
    skus = list(skus)
    for sku in skus:
        if not isinstance(sku, str):
            raise ConfigError(f"a sku is text, not {sku!r} (product ids go in ids)")
    ids = [check_int("a product id", product_id, 1) for product_id in ids]
    missing_ok = check_flag("missing_ok", missing_ok)
    if not skus and not ids:
        raise ConfigError("name at least one product to remove (a sku, or an id)")
    removed: dict[str, int] = {}
    with open_catalog(catalog_dir) as catalog:
        targets: dict[int, str] = {}  # a product named twice (sku and id, say) is removed once
        for sku in skus:
            found = catalog.find_product(sku)
            if found is None:
                if missing_ok:
                    continue
                hint = (
                    f" (product id {sku}? ids are given as ids: --id {sku})"
                    if sku.isdigit()
                    else " (removed by an earlier run? --missing-ok skips what is gone)"
                )
                raise NotFoundError(f"no product with sku {sku!r}{hint}")
            targets[found.id] = found.sku
        for product_id in ids:
            try:
                product = catalog.get_product(product_id)
            except NotFoundError:
                if missing_ok:
                    continue
                raise
            targets[product.id] = product.sku
        for product_id, sku in targets.items():
            removed[sku] = catalog.remove_product(product_id)
    return removed


def collect_garbage(
    catalog_dir: PathLike, *, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS
) -> GcReport:
    """Remove the catalog's blob files no image references (left by deletes before blobs were
    freed with their images, or by an ingest that died before committing) and temp files of
    interrupted blob writes, when older than ``grace_seconds``."""
    check_flag("dry_run", dry_run)
    grace_seconds = check_number("grace_seconds", grace_seconds, 0.0)
    try:
        catalog = open_catalog(catalog_dir)
    except CatalogStorageError as exc:  # a full disk is when space is needed most
        log.warning("%s; opening it alone instead (other processes wait until gc ends)", exc)
        catalog = open_catalog(catalog_dir, alone=True)
    with catalog:
        return catalog.collect_garbage(dry_run=dry_run, min_age_seconds=grace_seconds)


def check_catalog(
    catalog_dir: PathLike, *, blobs: bool = True, sample: int = 200
) -> integrity.CheckReport:
    """Read everything the catalog derives from its store (index files, product vectors,
    blob files) and compare it with the store; changes nothing (see
    :mod:`snapshop.integrity`). ``blobs=False`` skips hashing the blob files; ``sample``
    entries per index are searched for themselves."""
    blobs = check_flag("blobs", blobs)
    with open_catalog(catalog_dir) as catalog:
        return integrity.check_catalog(catalog, blobs=blobs, sample=sample)


def migrate(
    source: PathLike,
    target: PathLike,
    *,
    mirror: bool = False,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> MigrateReport:
    """Copy catalog ``source`` to ``target`` (directory <-> ``postgresql://…``) without
    re-embedding; ``mirror``: remove from the target what the source lacks; see
    ``snapshop.catalog.migrate``."""
    from snapshop.catalog.migrate import migrate_catalog

    if progress_total:
        with open_catalog(source) as catalog:
            progress_total(catalog.counts()["products"])
    return migrate_catalog(source, target, mirror=mirror, progress=progress)


# --- shop features (issue #18): more like this, similar-product export, duplicates -----------
def check_output(path: PathLike, catalog_dir: PathLike, what: str) -> Path:
    """``path`` as a Path if the ``what`` file can be written there: outside the catalog's
    directory (a file there could replace the catalog's own), not a folder, and below a
    folder or where one can be made; checked before the work, which may take long."""
    path = Path(path)
    target = path.resolve()
    if not is_server_target(catalog_dir):
        catalog = Path(catalog_dir).resolve()
        if target == catalog or catalog in target.parents:
            raise ConfigError(
                f"{path}: the {what} would be written inside the catalog {catalog_dir};"
                " write it outside the catalog's directory"
            )
    if target.is_dir():
        raise ConfigError(f"{path}: is a folder; give the {what}'s file name")
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"{path}: {parent} is not a folder")
    return path


from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # imported where used: they load faiss, which the CLI's start-up avoids
    from snapshop.catalog.migrate import MigrateReport
    from snapshop.duplicates import DuplicateReport
    from snapshop.recommend import ExportReport


def similar(
    catalog_dir: PathLike,
    product: str | int,
    *,
    k: int = 10,
    position: str | None = None,
    filters: ProductFilter | None = None,
) -> SearchResult:
    """More like this for a catalog product (sku or id) from its stored vectors: image-based
    and item-based results, the product itself excluded (see ``snapshop.similar``)."""
    from snapshop.similar import similar_products

    with open_catalog(catalog_dir) as catalog:
        return similar_products(catalog, product, k, position=position, filters=filters)


def recommend(
    catalog_dir: PathLike,
    out: PathLike,
    *,
    k: int = 20,
    position: str | None = None,
    batch_size: int = 1024,
    restart: bool = False,
    spreadsheet_safe: bool = True,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write every product's ``k`` most similar products (by product vector) to ``out`` (.csv,
    .jsonl, or .parquet when pyarrow is installed), resuming an interrupted export of the same
    file unless ``restart``; a CSV's skus that a spreadsheet would run as formulas are written
    as text unless not ``spreadsheet_safe`` (see ``snapshop.recommend``)."""
    from snapshop.recommend import export_similar

    out = check_output(out, catalog_dir, "export")
    with open_catalog(catalog_dir) as catalog:
        return export_similar(
            catalog, out, k, position=position, batch_size=batch_size, restart=restart,
            spreadsheet_safe=spreadsheet_safe, progress_total=progress_total, progress=progress,
        )  # fmt: skip


def duplicates(
    catalog_dir: PathLike,
    *,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    pixel_check: bool = True,
    out: PathLike | None = None,
    html: PathLike | None = None,
    spreadsheet_safe: bool = True,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> DuplicateReport:
    """Near-identical image pairs across different products: vector similarity >=
    ``threshold``, confirmed on the stored files by pixel similarity >= ``pixel_threshold``
    unless not ``pixel_check`` (None: the defaults in ``snapshop.duplicates``). Written as CSV
    to ``out`` (skus a spreadsheet would run as formulas as text, unless not
    ``spreadsheet_safe``) and as a page of side-by-side thumbnails to ``html`` when given."""
    from snapshop import duplicates as dup

    check_flag("pixel_check", pixel_check)
    check_flag("spreadsheet_safe", spreadsheet_safe)
    out = None if out is None else check_output(out, catalog_dir, "CSV")
    html = None if html is None else check_output(html, catalog_dir, "page")
    if out is not None and out.suffix.lower() != ".csv":
        raise ConfigError(f"{out}: duplicates are written as CSV; name the file .csv")
    if out is not None and html is not None and out.resolve() == html.resolve():
        raise ConfigError(f"{out}: the CSV and the page would be one file; name two")
    with open_catalog(catalog_dir) as catalog:
        if progress_total:
            progress_total(catalog.counts()["images"])
        pixel = dup.DEFAULT_PIXEL_THRESHOLD if pixel_threshold is None else pixel_threshold
        report = dup.find_duplicates(
            catalog, dup.DEFAULT_THRESHOLD if threshold is None else threshold,
            pixel_threshold=pixel if pixel_check else None, progress=progress,
        )  # fmt: skip
        if out is not None:
            dup.write_csv(report.pairs, out, spreadsheet_safe=spreadsheet_safe)
        if html is not None:
            dup.write_html(catalog, report, html)
        return report
