"""Command line: each command parses arguments, calls one library function, prints the result."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from snapshop import api
from snapshop.catalog.blobs import DEFAULT_GRACE_SECONDS
from snapshop.errors import ConfigError, ManifestError, SnapshopError

app = typer.Typer(help="snapshop: visual search for e-commerce.", no_args_is_help=True,
                  pretty_exceptions_enable=False)  # fmt: skip
catalog_app = typer.Typer(help="Inspect and edit a catalog.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

CatalogOpt = Annotated[Path, typer.Option("--catalog", "-c", help="Catalog directory.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Model directory or backbone name (default: the catalog's)."
    ),
]
DetectorOpt = Annotated[
    str | None,
    typer.Option("--detector", help="Garment detector: none, segmenter, pose, yolo:FILE.onnx, ..."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _print_error(exc: BaseException) -> None:
    """One line on stderr: never wrapped, and ``[...]`` in the message is text, not markup."""
    message = escape(str(exc).replace("\n", " "))
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


def _describe_os_error(exc: OSError) -> str:
    """``[Errno 21] Is a directory: 'out'`` -> ``cannot use out: Is a directory``."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileExistsError) and names and not Path(names[0]).is_dir():
        reason = "it is a file, and a folder is needed there"  # mkdir's "File exists"
    return f"cannot use {' or '.join(names)}: {reason}" if names else reason


def run(fn: Callable[[], T]) -> T:
    """Call ``fn``; user errors become a one-line message and a non-zero exit code."""
    try:
        return fn()
    except (ConfigError, ManifestError) as exc:
        _print_error(exc)
        raise typer.Exit(2) from None
    except SnapshopError as exc:
        _print_error(exc)
        raise typer.Exit(1) from None
    except OSError as exc:  # a path the user gave that cannot be read or written, a full disk
        logging.getLogger(__name__).debug("file system error", exc_info=True)
        _print_error(_describe_os_error(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def progress_bar(description: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(set_total, advance) callbacks; a live bar only on a terminal."""
    if not err.is_terminal:
        yield (lambda total: None), (lambda n: None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(description, total=None, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            t = bar.tasks[task]
            if t.elapsed:
                bar.update(task, rate=f"{t.completed / t.elapsed:.1f} img/s")

        yield (lambda total: bar.update(task, total=total)), advance


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip


@app.command()
def index(
    source: Annotated[Path, typer.Argument(help="Folder of product folders, or a CSV manifest.")],
    catalog: CatalogOpt,
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, max=512)] = 32,
    sync: Annotated[
        bool, typer.Option(help="Remove images of listed products the source no longer has.")
    ] = False,
    index_kind: Annotated[
        str | None,
        typer.Option(
            help="auto (default for new catalogs), flat, hnsw, pgvector, milvus;"
            " changing it rebuilds the indexes from the store."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Decode processes (default: one per core).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a folder or CSV manifest to a catalog (created on first use); re-runs are idempotent."""
    with progress_bar("indexing") as (set_total, advance):
        report = run(lambda: api.index_source(
            source, catalog, model=model, detector=detector, batch_size=batch_size, sync=sync,
            progress_total=set_total, progress=advance, index_kind=index_kind, workers=workers,
        ))  # fmt: skip
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        out.print(
            f"added {report.added} images ({report.crops} garment crops), skipped {report.skipped}"
            f" already indexed, {len(report.failed)} failed, removed {report.removed};"
            f" {len(report.products)} products; {report.seconds:.1f} s"
            f" ({report.images_per_second:.1f} img/s)"
        )
        for source_path, reason in report.failed[:20]:
            err.print(f"  [yellow]failed[/yellow] {escape(f'{source_path}: {reason}')}",
                      highlight=False, soft_wrap=True)  # fmt: skip
        if len(report.failed) > 20:
            err.print(f"  ... and {len(report.failed) - 20} more (all of them: --json)")
    if report.failed and report.added == 0 and report.skipped == 0:
        raise typer.Exit(1)


def _hits_table(title: str, hits: list[Any]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("#", "product", "sku", "title", "price", "score", "image"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        price = "" if h.price is None else f"{h.price:.2f} {h.currency or ''}".strip()
        table.add_row(str(rank), str(h.product_id), h.sku, h.title or "", price,
                      f"{h.score:.4f}", str(h.image_id))  # fmt: skip
    return table


@app.command()
def search(
    image: Annotated[Path, typer.Argument(help="Query image file.")],
    catalog: CatalogOpt,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Products per result list.")] = 10,
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    category: Annotated[str | None, typer.Option(help="Only products of this category.")] = None,
    min_price: Annotated[float | None, typer.Option(min=0)] = None,
    max_price: Annotated[float | None, typer.Option(min=0)] = None,
    save_boxes: Annotated[
        Path | None, typer.Option(help="Save the query with its boxes as PNG.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the catalog products that look like IMAGE (image-based and item-based results)."""
    from snapshop.search import ProductFilter

    result = run(lambda: api.search_image(
        image, catalog, k=k, model=model, detector=detector,
        filters=ProductFilter(category, min_price, max_price),
    ))  # fmt: skip
    if save_boxes is not None:
        from snapshop.visualize import draw_detections

        run(lambda: draw_detections(image, result.detections, save_boxes))
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(_hits_table("Similar images (image-based)", result.image_results))
    for item in result.item_results:
        box = ", ".join(f"{v:.0f}" for v in item.box)
        out.print(_hits_table(f"Similar items: {item.position} ({item.label} {item.score:.2f},"
                              f" box {box})", item.results))  # fmt: skip
    timings = "  ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
    out.print(f"[dim]{timings}[/dim]")


@catalog_app.command("info")
def catalog_info(catalog: CatalogOpt, as_json: JsonOpt = False) -> None:
    """Counts, model and index of a catalog."""
    info = run(lambda: api.catalog_info(catalog))
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    out.print(table)


@catalog_app.command("remove")
def catalog_remove(
    products: Annotated[list[str], typer.Argument(help="Product ids or skus.")],
    catalog: CatalogOpt,
) -> None:
    """Remove products (their images, crops and vectors) from a catalog."""
    removed = run(lambda: api.remove_products(catalog, products))
    for key, n in removed.items():
        out.print(f"removed product {key} ({n} images)")


@catalog_app.command("reindex")
def catalog_reindex(
    catalog: CatalogOpt,
    memory: Annotated[
        str, typer.Option("--memory", help="Resident memory for all indexes: 2GB, 512MiB, ...")
    ] = "2GiB",
    max_ms: Annotated[
        float, typer.Option("--max-ms", min=0.001, help="Latency budget of one query (ms).")
    ] = 20.0,
    recall: Annotated[
        float, typer.Option("--recall", min=0.01, max=1.0, help="Target recall@10 vs exact.")
    ] = 0.95,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the indexes by a memory/latency budget; print what was chosen and measured."""
    from snapshop.catalog.catalog import reindex_catalog
    from snapshop.index.choose import IndexBudget, parse_bytes

    report = run(lambda: reindex_catalog(catalog, IndexBudget(
        parse_bytes(memory), max_ms, target_recall=recall)))  # fmt: skip
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(f"chose {report['kind']} {json.dumps(report['params'])}")
    out.print(f"  {report['reason']}")
    table = Table("index", "vectors", "MB", "B/vector", "recall@10", "p50 ms", "p99 ms", "search")
    for name, m in report["indexes"].items():
        mem = m.get("memory_bytes")
        table.add_row(name, str(m.get("count", 0)), "-" if mem is None else f"{mem / 1e6:.1f}",
                      str(m.get("bytes_per_vector", "-")), str(m.get("recall_at_10", "-")),
                      str(m.get("p50_ms", "-")), str(m.get("p99_ms", "-")),
                      json.dumps(m.get("search_params", {})))  # fmt: skip
    out.print(table)


@catalog_app.command("gc")
def catalog_gc(
    catalog: CatalogOpt,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be removed; remove nothing.")
    ] = False,
    grace: Annotated[
        float,
        typer.Option(
            min=0, help="Keep files younger than this many seconds (an ingest may be in flight)."
        ),
    ] = DEFAULT_GRACE_SECONDS,
    as_json: JsonOpt = False,
) -> None:
    """Remove blob files no image references, and leftovers of interrupted blob writes."""
    report = run(lambda: api.collect_garbage(catalog, dry_run=dry_run, grace_seconds=grace))
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    mib = 1024 * 1024
    if report.dry_run:
        out.print(
            f"dry run: would remove {report.orphans_found} unreferenced blobs and"
            f" {report.temp_files_found} temp files ({report.reclaimable_bytes / mib:.1f} MiB)"
        )
    else:
        out.print(
            f"removed {report.orphans_removed} of {report.orphans_found} unreferenced blobs and"
            f" {report.temp_files_removed} of {report.temp_files_found} temp files,"
            f" freed {report.bytes_freed / mib:.1f} MiB"
        )
    out.print(
        f"scanned {report.files_scanned} files; kept {report.young_files_kept} unreferenced"
        f" files younger than {report.grace_seconds:g} s; stale thumbnails:"
        f" {report.stale_thumbnails} found, {report.thumbnails_removed} removed"
    )
    if report.missing_blobs:
        err.print(
            f"[yellow]warning:[/yellow] {report.missing_blobs} blob files that images name are"
            " missing", highlight=False,
        )  # fmt: skip


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the demo.")] = Path(
        "demo-catalog"
    ),
    k: Annotated[int, typer.Option("-k", min=1, max=50)] = 5,
    model: ModelOpt = None,
    products: Annotated[int, typer.Option(min=2, max=128, help="Demo products.")] = 24,
) -> None:
    """Generate a small demo catalog, index it and search it with an unseen photo."""
    from snapshop.demo import generate_demo_catalog, search_demo_queries

    manifest, queries = run(
        lambda: generate_demo_catalog(directory / "source", n_products=products)
    )
    out.print(f"demo catalog source: {manifest} ({len(queries)} products)")
    with progress_bar("indexing demo") as (set_total, advance):
        report = run(lambda: api.index_source(
            manifest, directory / "catalog", model=model, progress_total=set_total,
            progress=advance,
        ))  # fmt: skip
    out.print(f"indexed {report.added} new images, {report.skipped} already there,"
              f" {report.seconds:.1f} s")  # fmt: skip
    results, recall_at_1 = run(lambda: search_demo_queries(directory / "catalog", queries, k))
    (query, sku), result = queries[0], results[0]
    out.print(f"query: {query} (a new photo of {sku})")
    out.print(_hits_table("Similar images", result.image_results))
    out.print(f"[dim]search {result.timings_ms['total']:.1f} ms[/dim]")
    out.print(f"recall@1 over {len(queries)} held-out demo photos: {recall_at_1:.2f}")


@app.command()
def evaluate(
    manifest: Annotated[
        Path, typer.Option(help="CSV with path, product_id, role (query|gallery).")
    ],
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Repeat to compare models.")
    ] = None,
    ks: Annotated[list[int] | None, typer.Option("-k", help="Recall@K cut-offs.")] = None,
    query_where: Annotated[
        list[str] | None, typer.Option(help="Keep queries with COLUMN=VALUE.")
    ] = None,
    gallery_where: Annotated[
        list[str] | None, typer.Option(help="Keep gallery rows with COLUMN=VALUE.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Also write JSON here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of recall vs K, one line per model.")
    ] = None,
    grid: Annotated[
        Path | None, typer.Option(help="Write a PNG grid of queries and their top-5 results.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recall@K, mAP@R, embed ms/image and search ms/query of one or more models."""
    from snapshop.data.manifest import parse_where
    from snapshop.evaluate.retrieval import DEFAULT_KS, evaluate_manifest

    cutoffs = tuple(sorted(set(ks))) if ks else DEFAULT_KS
    plot_ks = (1, 2, 4, 5, 8, 10, 16, 32, 64, 100) if plot else ()
    reports = []
    for m in model or [None]:
        reports.append(run(lambda m=m: evaluate_manifest(
            manifest, m, tuple(sorted(set(cutoffs) | set(plot_ks))),
            run(lambda: parse_where(query_where)), run(lambda: parse_where(gallery_where)),
        )))  # fmt: skip
    if plot:
        import dataclasses

        from snapshop.evaluate.plots import plot_recall

        shown = [  # K beyond the product count says nothing
            dataclasses.replace(r, recall={k: v for k, v in r.recall.items() if k <= r.n_products})
            for r in reports
        ]
        where = " ".join((query_where or []) + (gallery_where or []))
        run(lambda: plot_recall(shown, plot, f"{manifest.name} {where}".strip()))
        err.print(f"recall plot: {plot}")
    if grid:
        from snapshop.evaluate.plots import plot_grid

        run(lambda: plot_grid(reports, grid))
        err.print(f"result grid: {grid}")
    data = [r.to_dict() for r in reports]
    if json_out:
        run(lambda: _write_json(json_out, data))
    if as_json:
        out.print_json(json.dumps(data))
        return
    first = reports[0]
    table = Table(title=f"{manifest}: {first.n_queries} queries, {first.n_gallery} gallery,"
                        f" {first.n_products} products")  # fmt: skip
    table.add_column("metric")
    for r in reports:
        table.add_column(r.name)
    for k in cutoffs:
        table.add_row(f"R@{k}", *(f"{r.recall[k]:.4f}" for r in reports))
    # Over products: with few of them, a difference inside these intervals is noise.
    table.add_row("R@1 95% CI", *(
        "{:.3f}–{:.3f}".format(*r.recall_ci[1]) if 1 in r.recall_ci else "" for r in reports
    ))  # fmt: skip
    table.add_row("mAP@R", *(f"{r.map_at_r:.4f}" for r in reports))
    table.add_row("embed ms/image", *(f"{r.embed_ms_per_image:.1f}" for r in reports))
    table.add_row("search ms/query", *(f"{r.search_ms_per_query:.3f}" for r in reports))
    out.print(table)
    for r in reports:
        for path, reason in r.skipped[:10]:
            err.print(f"[yellow]skipped[/yellow] {escape(f'{path}: {reason}')}", highlight=False,
                      soft_wrap=True)  # fmt: skip


# --- service (issue #5) ---------------------------------------------------------------------
@app.command()
def serve(
    catalog: CatalogOpt,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    api_key_env: Annotated[
        str,
        typer.Option(help="Environment variable with the API key for writes (unset: read-only)."),
    ] = "SNAPSHOP_API_KEY",
    max_upload_mb: Annotated[float, typer.Option(min=0.1, max=1024)] = 10.0,
    search_threads: Annotated[
        int, typer.Option(min=0, max=256, help="faiss threads per search (0: all cores).")
    ] = 1,
    embed_threads: Annotated[
        int, typer.Option(min=0, max=256, help="ONNX Runtime threads per request (0: default).")
    ] = 0,
) -> None:
    """Serve the REST API (/v1, docs at /docs) and the web page (/) over a catalog."""
    from snapshop.service import ServiceSettings, api_key_from_env, serve

    settings = run(lambda: ServiceSettings(
        catalog, model=model, detector=detector, api_key=api_key_from_env(api_key_env),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        search_threads=search_threads or None, embed_threads=embed_threads or None,
    ))  # fmt: skip
    if not settings.writes_enabled:
        err.print(f"[dim]${api_key_env} is not set: product writes are disabled[/dim]")
    run(lambda: serve(settings, host=host, port=port))


# --- metric learning: dataset protocol and training (issue #3) ------------------------------
@app.command()
def prepare(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Datasets: PATH or FORMAT:PATH (inshop, street2shop, csv, folder, catalog)."
        ),
    ],
    output: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")],
    test_fraction: Annotated[float, typer.Option(help="Fraction of products held out.")] = 0.2,
    min_images: Annotated[int, typer.Option(min=1, help="Keep products with >= this many.")] = 2,
    max_images: Annotated[
        int, typer.Option(min=0, help="Keep products with <= this many images (0: no limit).")
    ] = 30,
    seed: Annotated[int, typer.Option()] = 0,
    keep_roles: Annotated[
        bool, typer.Option(help="Keep the sources' query/gallery roles for test images.")
    ] = False,
    folds: Annotated[
        int, typer.Option(min=0, help="K >= 2: cross-validation, hold out part --fold of K.")
    ] = 0,
    fold: Annotated[int, typer.Option(min=0, help="Which of the --folds parts is held out.")] = 0,
) -> None:
    """The reference protocol: merge sources, split products into train/test, write a manifest."""
    from snapshop.data.protocol import ProtocolConfig
    from snapshop.data.protocol import prepare as prepare_manifest

    config = run(
        lambda: ProtocolConfig(
            test_fraction, min_images, max_images, seed, keep_roles, folds=folds, fold=fold
        )
    )
    _, counts = run(lambda: prepare_manifest(sources, output, config))
    part = f", fold {fold} of {folds}" if folds else ""
    table = Table(title=f"{output} (seed {seed}{part}; {counts.dropped_products} products dropped)")
    for col in ("split/role", "products", "images"):
        table.add_column(col)
    for name, n_products, n_images in counts.table():
        table.add_row(name, str(n_products), str(n_images))
    out.print(table)


@app.command()
def train(
    manifest: Annotated[Path, typer.Option(help="Manifest CSV (e.g. from `snapshop prepare`).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    train_where: Annotated[
        list[str] | None, typer.Option(help="Training rows: COLUMN=VALUE (default split=train).")
    ] = None,
    eval_where: Annotated[
        list[str] | None,
        typer.Option(help="Held-out rows scored every epoch (default split=test when present)."),
    ] = None,
    eval_gallery_where: Annotated[
        list[str] | None, typer.Option(help="Also score a gallery subset, e.g. domain=iconic.")
    ] = None,
    backbone: Annotated[str, typer.Option()] = "efficientnet_lite2",
    dim: Annotated[int, typer.Option(min=2, max=4096)] = 512,
    temperature: Annotated[float, typer.Option(min=1e-4)] = 0.05,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs, the warm-up epoch included.")] = 8,
    lr: Annotated[float, typer.Option(min=1e-8)] = 0.01,
    lr_step: Annotated[int, typer.Option(min=1, help="lr x0.1 every N epochs.")] = 4,
    backbone_lr_scale: Annotated[
        float | None,
        typer.Option(help="Backbone lr = lr x this (default 0.1 with --train-blocks -1, else 1)."),
    ] = None,
    classes_per_batch: Annotated[int, typer.Option("-p", min=2)] = 16,
    samples_per_class: Annotated[int, typer.Option("-k", min=1)] = 4,
    train_blocks: Annotated[
        int, typer.Option(min=-1, help="Last blocks to train (0: backbone frozen, -1: all).")
    ] = 0,
    cache: Annotated[
        bool | None,
        typer.Option(help="Cache the frozen part's outputs (default: unless --train-blocks -1)."),
    ] = None,
    views: Annotated[int, typer.Option(min=1, help="Cached views per image.")] = 4,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(min=0)] = 2,
    workers: Annotated[
        int, typer.Option(min=0, help="Image-decoding processes when not caching.")
    ] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Frozen-feature cache (default OUT/cache); shareable.")
    ] = None,
    repeat_where: Annotated[
        list[str] | None,
        typer.Option(help="Training rows to repeat, COLUMN=VALUE (e.g. domain=iconic)."),
    ] = None,
    repeat: Annotated[
        int, typer.Option(min=1, help="How many times --repeat-where rows are listed.")
    ] = 1,
) -> None:
    """Train a NormSoftmax embedder and export it (model.onnx + model.json) to OUT."""
    from snapshop.data.manifest import parse_where, read_manifest, repeat_matching
    from snapshop.train.trainer import TrainConfig, split_rows
    from snapshop.train.trainer import train as train_model

    config = run(lambda: TrainConfig(
        backbone=backbone, dim=dim, temperature=temperature, epochs=epochs, lr=lr,
        lr_step=lr_step, backbone_lr_scale=backbone_lr_scale, classes_per_batch=classes_per_batch,
        samples_per_class=samples_per_class, train_blocks=train_blocks,
        cache=train_blocks != -1 if cache is None else cache,
        views=views, device=device, threads=threads, workers=workers, seed=seed,
    ))  # fmt: skip
    rows = run(lambda: read_manifest(manifest))
    has_split = any("split" in r.extra for r in rows)
    t_where = run(lambda: parse_where(train_where)) or ({"split": "train"} if has_split else {})
    e_where = run(lambda: parse_where(eval_where)) or ({"split": "test"} if has_split else None)
    g_where = run(lambda: parse_where(eval_gallery_where)) or None
    train_rows, eval_rows = run(lambda: split_rows(rows, t_where, e_where))
    r_where = run(lambda: parse_where(repeat_where))
    train_rows = run(lambda: repeat_matching(train_rows, r_where, repeat))

    def show(record: dict[str, Any]) -> None:
        scores = "  ".join(f"{k} R@1 {v['R@1']:.3f}" for k, v in record.items()
                           if k.startswith("photo_to"))  # fmt: skip
        err.print(f"epoch {record['epoch']} lr {record['lr']:g} loss {record['loss']:.4f}"
                  f" ({record['seconds']:.0f} s)  {scores}", highlight=False)  # fmt: skip

    result = run(lambda: train_model(
        train_rows, out_dir, config, eval_rows or None, g_where, resume=resume,
        data_name=str(manifest), progress=show, cache_dir=cache_dir,
    ))  # fmt: skip
    out.print(f"trained on {len(result.classes)} products in {result.seconds:.0f} s;"
              f" model: {result.model_dir}")  # fmt: skip
    if result.metrics:
        out.print_json(json.dumps(result.metrics))


# --- scale: int8 quantisation (issue #6) -----------------------------------------------------
@app.command()
def quantize(
    calibration: Annotated[
        Path,
        typer.Option(help="Catalog images: a folder, catalog CSV or evaluation manifest."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model directory or backbone name.")
    ] = "efficientnet_lite2",
    max_images: Annotated[int, typer.Option(min=1, help="Calibration images to sample.")] = 256,
    method: Annotated[str, typer.Option(help="minmax, entropy or percentile.")] = "minmax",
) -> None:
    """Static int8 (QDQ) copy of a model, calibrated on catalog images; check its recall with
    `snapshop evaluate --model OUT`."""
    from snapshop.models.quantize import quantize as quantize_model

    card = run(lambda: quantize_model(model, calibration, out_dir, max_images=max_images,
                                      method=method))  # fmt: skip
    calib = card.training.get("quantization", {}).get("calibration_images")
    out.print(f"wrote {out_dir} ({card.model_id}, {calib} calibration images)")


# --- detection: detector evaluation (issue #4) -----------------------------------------------
def _interval(lo: float, hi: float) -> str:
    return "" if lo != lo else f"({lo:.3f}–{hi:.3f})"  # lo != lo: NaN, nothing to resample


@app.command("evaluate-detector")
def evaluate_detector(
    boxes: Annotated[
        Path, typer.Option(help="CCP-format CSV: path, group, x1, y1, x2, y2 (extra columns ok).")
    ],
    images_root: Annotated[
        Path | None, typer.Option(help="Folder the CSV paths are relative to (default: its own).")
    ] = None,
    detector: Annotated[
        str, typer.Option("--detector", help="Detector spec: segmenter, pose, yolo:FILE.onnx, ...")
    ] = "segmenter",
    iou: Annotated[float, typer.Option(min=0.01, max=1.0, help="IoU for a match.")] = 0.5,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Also write JSON here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-position recall / precision at IoU >= 0.5 and per-image latency of a detector."""
    from snapshop.detect.factory import create_detector
    from snapshop.evaluate.detection import evaluate_detector as evaluate_boxes

    det = run(lambda: create_detector(detector))
    if det is None:
        err.print("[red]error:[/red] --detector none has nothing to evaluate", highlight=False)
        raise typer.Exit(2)
    with progress_bar("detecting") as (_, advance):
        report = run(lambda: evaluate_boxes(boxes, det, images_root, iou_threshold=iou,
                                            limit=limit, progress=advance))  # fmt: skip
    data = report.to_dict()
    if json_out:
        run(lambda: _write_json(json_out, data))
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table(title=f"{boxes}: {report.images} images, detector {detector}, IoU >= {iou}")
    for col in ("position", "ground truth", "predicted", "TP", "recall", "precision"):
        table.add_column(col)
    for pos, s in report.positions.items():
        ci = s.intervals()
        table.add_row(pos, str(s.ground_truth), str(s.predicted), str(s.true_positive),
                      f"{s.recall:.3f} {_interval(*ci['recall'])}",
                      f"{s.precision:.3f} {_interval(*ci['precision'])}")  # fmt: skip
    out.print(table)
    out.print("(lo–hi): 95 % bootstrap interval over images")
    p50, mean = report.latency_p50_ms, report.latency_mean_ms
    out.print(f"detect ms/image: p50 {p50:.1f}, mean {mean:.1f}")
    for path, reason in report.failed[:10]:
        err.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False)


def entrypoint() -> None:  # pragma: no cover
    sys.exit(app())
