"""Command line: each command parses arguments, calls one library function, prints the result."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from snapshop import api
from snapshop.catalog.blobs import DEFAULT_GRACE_SECONDS
from snapshop.config import is_ascii_digits
from snapshop.errors import ConfigError, ManifestError, SnapshopError
from snapshop.ingest_ray import RayConfig


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a container stopping): unwound as Ctrl-C is, so an ingest ends its
    decode workers and says so, instead of dying mid-line."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


class _App(typer.Typer):
    """The console script's app: a stdout that cannot take the output (a full disk, an I/O
    error) ends it with a one-line error and exit 1 rather than a traceback; SIGTERM ends it
    as Ctrl-C does, with exit 143 (a server installs its own handler when it starts)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # decode workers are spawned, not forked, so they do not inherit this handler
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)
        for stream in (sys.stdout, sys.stderr):  # a stdout that is not UTF-8 (PYTHONIOENCODING
            reconfigure = getattr(stream, "reconfigure", None)  # =ascii): escapes, no traceback
            if reconfigure is not None:
                reconfigure(errors="backslashreplace")
        _drop_bad_columns()  # Typer's help and usage errors: blank at width 0
        try:
            return super().__call__(*args, **kwargs)
        except OSError as exc:
            try:
                _print_error(_describe_os_error(exc))
                # Python flushes stdout once more on exit: that would fail (and say so) again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, AttributeError, ValueError):  # stderr unwritable too; no stdout
                pass
            sys.exit(1)


app = _App(help="snapshop: visual search for e-commerce.", no_args_is_help=True,
           pretty_exceptions_enable=False)  # fmt: skip
catalog_app = typer.Typer(help="Inspect and edit a catalog.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
db_app = typer.Typer(
    help="A local PostgreSQL + pgvector server for trying a server catalog on one machine.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")


def _drop_bad_columns() -> None:
    """Forget a ``COLUMNS`` that is no positive number of ASCII digits: rich and click parse
    it with int(), which fails on "²" (a digit to str.isdigit) and on "x"."""
    columns = os.environ.get("COLUMNS", "1").strip()
    if not is_ascii_digits(columns) or int(columns) < 1:
        os.environ.pop("COLUMNS", None)


def _console(stderr: bool = False) -> Console:
    """Text is printed as text: catalog values and paths hold "[...]" and ":name:" (rich
    markup, emoji codes). Lines are not wrapped at the width (80 columns in a pipe) so that a
    script reads each whole; tables still fit it."""
    _drop_bad_columns()
    console = Console(stderr=stderr, markup=False, emoji=False, soft_wrap=True)
    if console.width < 1:  # COLUMNS=0 (Emacs shells, some containers): rich prints nothing
        console.width = 80
    return console


out = _console()
err = _console(stderr=True)
T = TypeVar("T")

CatalogOpt = Annotated[
    str,
    typer.Option(
        "--catalog", "-c", envvar="SNAPSHOP_CATALOG",
        help="Catalog directory, or a PostgreSQL URI (postgresql://…) for a server catalog.",
    ),
]  # fmt: skip
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
RawCsvOpt = Annotated[
    bool,
    typer.Option(
        "--raw-csv",
        help="Write CSV cells exactly, for programs: by default a sku a spreadsheet would run"
        " as a formula (=, +, -, @...) gets a quote in front.",
    ),
]


def _print_error(exc: BaseException | str) -> None:
    """One line on stderr."""
    message = str(exc).replace("\n", " ")
    err.print(Text.assemble(("error:", "red"), " ", message), highlight=False)


def _print_json(data: Any) -> None:
    """``--json`` output: never coloured, even where FORCE_COLOR or a terminal asks for it;
    ASCII with ``\\u`` escapes on a stdout that cannot take every character."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    out.print_json(data=data, highlight=False, ensure_ascii=not encoding.startswith("utf"))


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
    except Terminated:
        err.print("terminated")
        raise typer.Exit(143) from None
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
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Decode, detect and embed on Ray: local (start one here), auto ($RAY_ADDRESS"
            " or this machine's cluster) or ray://HEAD:10001. Needs snapshop[ray].",
        ),
    ] = None,
    ray_actors: Annotated[
        int | None, typer.Option(min=1, help="Ray actors (default: one per cluster CPU).")
    ] = None,
    ray_gpus: Annotated[
        float, typer.Option(min=0, help="GPUs per Ray actor (embedding on CUDA).")
    ] = 0.0,
    ray_max_worker_deaths: Annotated[
        int,
        typer.Option(
            min=1,
            help="Ray workers that may die of something else than an image before the ingest"
            " stops (a node short of memory); images that kill workers are found by bisecting"
            " their batch and reported as failed, whatever their number.",
        ),
    ] = RayConfig.max_worker_deaths,
    ray_retry_killers: Annotated[
        bool,
        typer.Option(
            "--ray-retry-killers",
            help="Send again the images that killed Ray workers in earlier runs (remembered"
            " by sha256 in the catalog and reported as failed without being sent otherwise).",
        ),
    ] = False,
    catalog_views: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=64,
            help="Average a packshot's vector (product alone on white, told by its white"
            " border) over the image, its mirror and N augmented views: photo -> catalog"
            " R@1 +0.03-0.04 with ImageNet Lite2, N+2 embeddings per packshot (24 measured;"
            " 0: off)."
            " Recorded in the catalog card (default: the card's, off for a new catalog).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a folder or CSV manifest to a catalog (created on first use); re-runs are idempotent.

    Exit codes: 0 every image is indexed; 1 some images failed (the others are indexed) or an
    error stopped the ingest (committed batches are kept); 2 bad usage or input (malformed
    CSV, no image to index): nothing written; 130 interrupted."""
    with progress_bar("indexing") as (set_total, advance):
        report = run(lambda: api.index_source(
            source, catalog, model=model, detector=detector, batch_size=batch_size, sync=sync,
            progress_total=set_total, progress=advance, index_kind=index_kind, workers=workers,
            ray=None if ray is None else RayConfig(ray, actors=ray_actors, gpus_per_actor=ray_gpus,
                                                   max_worker_deaths=ray_max_worker_deaths,
                                                   retry_killers=ray_retry_killers),
            catalog_views=catalog_views,
        ))  # fmt: skip
    if as_json:
        _print_json(report.to_dict())
    else:
        out.print(
            f"added {report.added} images ({report.crops} garment crops), skipped {report.skipped}"
            f" already indexed, {len(report.failed)} failed, {len(report.ignored)} not supported,"
            f" removed {report.removed}; {len(report.products)} products;"
            f" {report.seconds:.1f} s ({report.images_per_second:.1f} img/s)"
        )
        _print_not_indexed("failed", report.failed)
        _print_not_indexed("not supported", report.ignored)
        if report.failed and not report.added and not report.skipped:
            err.print("nothing was indexed")
    if report.failed:
        raise typer.Exit(1)


def _print_not_indexed(what: str, entries: list[tuple[str, str]], shown: int = 20) -> None:
    for source_path, reason in entries[:shown]:
        err.print(Text.assemble("  ", (what, "yellow"), f" {source_path}: {reason}"),
                  highlight=False)  # fmt: skip
    if len(entries) > shown:
        err.print(f"  ... and {len(entries) - shown} more {what} (all of them: --json)")


def terminal_text(value: object) -> str:
    """``value`` as a table cell shows it: every control, format or separator character (ESC,
    NUL, bidi overrides...) written as a visible ``\\x1b``-style escape, so catalog text (rows
    written before it was checked, too) cannot drive the terminal or disguise itself."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in _HIDDEN_CATEGORIES
        else ch
        for ch in str(value)
    )


_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _catalog_text(value: object) -> Text:
    """``terminal_text`` as rich ``Text``: inert on any console, markup and emoji codes too."""
    return Text(terminal_text(value))


def _hits_table(title: str, hits: list[Any]) -> Table:
    table = Table(title=_catalog_text(title), title_justify="left")
    for col in ("#", "product id", "sku", "title", "price", "score", "image id"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        price = "" if h.price is None else f"{h.price:.2f} {h.currency or ''}".strip()
        table.add_row(str(rank), str(h.product_id), _catalog_text(h.sku),
                      _catalog_text(h.title or ""), _catalog_text(price), f"{h.score:.4f}",
                      str(h.image_id))  # fmt: skip
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
    ranking: Annotated[
        str,
        typer.Option(help="Rank image-based results by 'product' vector or by best 'image'."),
    ] = "product",
    flip_query: Annotated[
        bool,
        typer.Option(
            help="Image-based results from the mean of the photo's and its mirror's"
            " embeddings (photo -> catalog R@1 +0.004 bf16 / +0.012 fp32; a second embedding)."
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="Re-rank the image-based results' top 10 by local-feature matches (spatial"
            " verification; printed packaging: docs/benchmarks/retrieval.md)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the catalog products that look like IMAGE (image-based and item-based results)."""
    from snapshop.search import ProductFilter

    result = run(lambda: api.search_image(
        image, catalog, k=k, model=model, detector=detector,
        filters=ProductFilter(category, min_price, max_price), ranking=ranking,
        flip_query=flip_query, verify=verify,
    ))  # fmt: skip
    if save_boxes is not None:
        from snapshop.visualize import draw_detections

        run(lambda: draw_detections(image, result.detections, save_boxes))
    if as_json:
        _print_json(result.to_dict())
        return
    out.print(_hits_table("Similar images (image-based)", result.image_results))
    for item in result.item_results:
        box = ", ".join(f"{v:.0f}" for v in item.box)
        out.print(_hits_table(f"Similar items: {item.position} ({item.label} {item.score:.2f},"
                              f" box {box})", item.results))  # fmt: skip
    timings = "  ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
    out.print(timings, style="dim")


@catalog_app.command("info")
def catalog_info(catalog: CatalogOpt, as_json: JsonOpt = False) -> None:
    """Counts, model and index of a catalog."""
    info = run(lambda: api.catalog_info(catalog))
    if as_json:
        _print_json(info)
        return
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    out.print(table)


@catalog_app.command("remove")
def catalog_remove(
    catalog: CatalogOpt,
    skus: Annotated[
        list[str] | None, typer.Argument(help="Skus of the products to remove.", show_default=False)
    ] = None,
    ids: Annotated[
        list[int] | None,
        typer.Option(
            "--id", help="Catalog id of a product to remove (repeatable).", show_default=False
        ),
    ] = None,
    missing_ok: Annotated[
        bool,
        typer.Option(
            "--missing-ok",
            help="Skip products that are not there (already removed), instead of removing nothing.",
        ),
    ] = False,
) -> None:
    """Remove products (their images, crops and vectors) from a catalog, by sku or --id."""
    removed = run(lambda: api.remove_products(catalog, skus or [], ids=ids or [],
                                              missing_ok=missing_ok))  # fmt: skip
    for sku, n in removed.items():
        out.print(f"removed product {terminal_text(sku)} ({n} images)", highlight=False)


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
        _print_json(report)
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


@catalog_app.command("check")
def catalog_check(
    catalog: CatalogOpt,
    blobs: Annotated[
        bool, typer.Option("--blobs/--no-blobs", help="Hash every blob file against its sha256.")
    ] = True,
    sample: Annotated[
        int, typer.Option(min=0, help="Entries per index searched for themselves (0: none).")
    ] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Compare what the catalog derives from its store (index files, product vectors, blob
    files) with the store; change nothing. Exit code 1 when something is wrong."""
    report = run(lambda: api.check_catalog(catalog, blobs=blobs, sample=sample))
    if as_json:
        _print_json(report.to_dict())
    else:
        out.print(", ".join(f"{n} {what}" for what, n in report.checked.items()), highlight=False)
        for name, recall in report.self_recall.items():
            out.print(f"{name}: finds {recall:.1%} of its own entries in its top 10")
        for note in report.notes:
            out.print(f"note: {terminal_text(note)}", highlight=False)
        for problem in report.problems:
            line = f" {problem.what} {problem.where}: {problem.detail}; fix: {problem.fix}"
            err.print(Text.assemble(("problem:", "red"), terminal_text(line)),
                      highlight=False)  # fmt: skip
        if report.ok:
            out.print("no problem found")
    if not report.ok:
        raise typer.Exit(1)


@catalog_app.command("migrate")
def catalog_migrate(
    source: Annotated[str, typer.Argument(help="Catalog to copy: a directory or a URI.")],
    target: Annotated[str, typer.Argument(help="Where to: a directory or postgresql://…")],
    mirror: Annotated[
        bool,
        typer.Option(
            "--mirror",
            help="Also remove from the target (a copy of the source) the products and images"
            " the source no longer has, so that it ends equal to the source.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy a catalog (directory <-> PostgreSQL) without re-embedding; rerun to resume or to
    bring an older copy up to date."""
    with progress_bar("migrating products") as (set_total, advance):
        report = run(lambda: api.migrate(source, target, mirror=mirror,
                                         progress_total=set_total, progress=advance))  # fmt: skip
    if as_json:
        _print_json(dataclasses.asdict(report))
        return
    replaced = f", {report.images_replaced} replaced" if report.images_replaced else ""
    out.print(
        f"{report.products} products checked in {terminal_text(report.target)}:"
        f" {report.images_copied} images copied ({report.images_present} already there"
        f"{replaced}), {report.crops_copied} crops, {report.thumbnails} thumbnails,"
        f" {report.vectors_checked} vectors compared, {report.seconds:.1f} s",
        highlight=False,
    )
    extra = (f"{report.products_not_in_source} products and {report.images_not_in_source}"
             " images the source does not have")  # fmt: skip
    if report.mirror and (report.products_not_in_source or report.images_not_in_source):
        out.print(f"removed {extra}", highlight=False)
    elif report.products_not_in_source or report.images_not_in_source:
        out.print(
            f"[yellow]the target holds {extra}: kept; run again with --mirror to remove them[/]",
            highlight=False,
        )


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
        _print_json(report.to_dict())
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
        err.print(Text.assemble(("warning:", "yellow"), f" {report.missing_blobs} blob files"
                                " that images name are missing"), highlight=False)  # fmt: skip


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
    out.print(f"search {result.timings_ms['total']:.1f} ms", style="dim")
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
    from snapshop.evaluate.retrieval import compare_models

    comparison = run(lambda: compare_models(
        manifest, model or [None], ks, query_where or (), gallery_where or (), plot, grid,
    ))  # fmt: skip
    cutoffs, reports = comparison.cutoffs, comparison.reports
    if plot:
        err.print(f"recall plot: {plot}")
    if grid:
        err.print(f"result grid: {grid}")
    data = [r.to_dict() for r in reports]
    if json_out:
        run(lambda: _write_json(json_out, data))
    if as_json:
        _print_json(data)
        return
    first = reports[0]
    table = Table(title=f"{manifest}: {first.n_queries} queries, {first.n_gallery} gallery,"
                        f" {first.n_products} products")  # fmt: skip
    table.add_column("metric")
    for r in reports:
        table.add_column(r.name)
    for k in cutoffs:
        table.add_row(f"R@{k}", *(f"{r.recall[k]:.4f}" for r in reports))
    for k in cutoffs:  # a hit when one of the top K images is of the product (the literature's)
        table.add_row(f"image R@{k}", *(f"{r.image_recall[k]:.4f}" for r in reports))
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
            err.print(Text.assemble(("skipped", "yellow"), f" {path}: {reason}"),
                      highlight=False)  # fmt: skip


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
    client_timeout: Annotated[
        float,
        typer.Option(
            min=1,
            max=3600,
            help="Seconds a client may take over its request line and headers, or"
            " stay silent while its body is due: then a 408, and the connection is closed.",
        ),
    ] = 20.0,
    body_timeout: Annotated[
        float,
        typer.Option(min=1, max=86400, help="Seconds a client may take over a whole request body."),
    ] = 300.0,
    search_threads: Annotated[
        int, typer.Option(min=0, max=256, help="faiss threads per search (0: all cores).")
    ] = 1,
    embed_threads: Annotated[
        int, typer.Option(min=0, max=256, help="ONNX Runtime threads per request (0: default).")
    ] = 0,
    flip_query: Annotated[
        bool | None,
        typer.Option(
            "--flip-query/--no-flip-query",
            help="Image-based results from the photo's and its mirror's mean embedding"
            " (default: $SNAPSHOP_FLIP_QUERY, else off).",
        ),
    ] = None,
    verify: Annotated[
        bool | None,
        typer.Option(
            "--verify/--no-verify",
            help="Re-rank image-based results by local-feature matches (spatial verification;"
            " default: $SNAPSHOP_VERIFY, else off).",
        ),
    ] = None,
) -> None:
    """Serve the REST API (/v1, docs at /docs) and the web page (/) over a catalog."""
    from snapshop.service import ServiceSettings, api_key_from_env, serve
    from snapshop.service.settings import VERIFY_ENV, flag_from_env, flip_query_from_env

    settings = run(lambda: ServiceSettings(
        catalog, model=model, detector=detector, api_key=api_key_from_env(api_key_env),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        header_timeout_s=client_timeout, body_idle_timeout_s=client_timeout,
        body_timeout_s=body_timeout,
        search_threads=search_threads or None, embed_threads=embed_threads or None,
        flip_query=flip_query_from_env() if flip_query is None else flip_query,
        verify=flag_from_env(VERIFY_ENV) if verify is None else verify,
    ))  # fmt: skip
    if not settings.writes_enabled:
        err.print(f"${api_key_env} is not set: product writes are disabled", style="dim")
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
    backbone: Annotated[
        list[str] | None,
        typer.Option(
            help="Backbone (default efficientnet_lite2). Given twice or more: one member each,"
            " merged into one model (needs --embed-size; see `snapshop merge-models`)."
        ),
    ] = None,
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
    catalog_domain: Annotated[
        bool,
        typer.Option(
            help="Packshots' training views are photo-like catalog views first (cut out onto"
            " clutter, zoomed out, white balance, blur, rotation)."
        ),
    ] = False,
    catalog_piles: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="With --catalog-domain: the share of packshot views that are piles of the"
            " product (over grey or clutter), as shops show fruit and cartons.",
        ),
    ] = 0.0,
    pooling: Annotated[
        str, typer.Option(help="Global pool of the last feature map: avg, or gem (p = 3).")
    ] = "avg",
    min_crop: Annotated[
        float,
        typer.Option(
            min=0.01, max=1.0, help="Smallest random crop of a training view, as an area fraction."
        ),
    ] = 0.35,
    input_size: Annotated[
        int | None,
        typer.Option(help="Training views are this many px square (default: the backbone's)."),
    ] = None,
    embed_size: Annotated[
        int | None,
        typer.Option(
            help="The exported model embeds at this many px (default: the training size);"
            " see `snapshop resize-model`."
        ),
    ] = None,
    anchor_where: Annotated[
        list[str] | None,
        typer.Option(
            help="Anchor rows, COLUMN=VALUE (e.g. domain=iconic): with --anchor-weight, every"
            " other row also learns to find its product's anchor among all products' anchors."
        ),
    ] = None,
    anchor_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the anchor term (0: off).")
    ] = 0.0,
) -> None:
    """Train a NormSoftmax embedder and export it (model.onnx + model.json) to OUT."""
    from snapshop.data.manifest import RowSelection
    from snapshop.train.augment import AugmentConfig
    from snapshop.train.ensemble import member_configs, train_ensemble_from_manifest
    from snapshop.train.trainer import TrainConfig, train_from_manifest

    backbones = backbone or ["efficientnet_lite2"]
    config = run(lambda: TrainConfig(
        backbone=backbones[0], dim=dim, temperature=temperature, epochs=epochs, lr=lr,
        lr_step=lr_step, backbone_lr_scale=backbone_lr_scale, classes_per_batch=classes_per_batch,
        samples_per_class=samples_per_class, train_blocks=train_blocks, cache=cache,
        views=views, device=device, threads=threads, workers=workers, seed=seed,
        augment=AugmentConfig(
            scale=(min_crop, 1.0), catalog_domain=catalog_domain, catalog_piles=catalog_piles
        ),
        pooling=pooling, input_size=input_size, embed_size=embed_size,
        anchor_where=tuple(anchor_where or ()), anchor_weight=anchor_weight,
    ))  # fmt: skip
    selection = RowSelection(
        tuple(train_where or ()), tuple(eval_where or ()), tuple(eval_gallery_where or ()),
        tuple(repeat_where or ()), repeat,
    )  # fmt: skip

    def show(record: dict[str, Any]) -> None:
        scores = "  ".join(f"{k} R@1 {v['R@1']:.3f}" for k, v in record.items()
                           if k.startswith("photo_to"))  # fmt: skip
        err.print(f"epoch {record['epoch']} lr {record['lr']:g} loss {record['loss']:.4f}"
                  f" ({record['seconds']:.0f} s)  {scores}", highlight=False)  # fmt: skip

    if len(backbones) > 1:
        configs = run(lambda: member_configs(config, backbones))

        def announce(n: int, member: TrainConfig) -> None:
            err.print(f"member {n}/{len(configs)}: {member.backbone}, seed {member.seed}",
                      highlight=False)  # fmt: skip

        merged = run(lambda: train_ensemble_from_manifest(
            manifest, out_dir, configs, selection, resume=resume, progress=show,
            cache_dir=cache_dir, on_member=announce,
        ))  # fmt: skip
        out.print(f"trained {len(merged.members)} members on {len(merged.members[0].classes)}"
                  f" products in {merged.seconds:.0f} s; model: {merged.model_dir}")  # fmt: skip
        if merged.metrics:
            _print_json(merged.metrics)
        return
    result = run(lambda: train_from_manifest(
        manifest, out_dir, config, selection, resume=resume, progress=show, cache_dir=cache_dir,
    ))  # fmt: skip
    out.print(f"trained on {len(result.classes)} products in {result.seconds:.0f} s;"
              f" model: {result.model_dir}")  # fmt: skip
    if result.metrics:
        _print_json(result.metrics)


# --- scale: int8 quantisation (issue #6) -----------------------------------------------------
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a model already in --out.")
]


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
    overwrite: OverwriteOpt = False,
) -> None:
    """Static int8 (QDQ) copy of a model, calibrated on catalog images; check its recall with
    `snapshop evaluate --model OUT`."""
    from snapshop.models.quantize import quantize as quantize_model

    card = run(lambda: quantize_model(model, calibration, out_dir, overwrite=overwrite,
                                      max_images=max_images, method=method))  # fmt: skip
    calib = card.training.get("quantization", {}).get("calibration_images")
    out.print(f"wrote {out_dir} ({card.model_id}, {calib} calibration images)")


@app.command("resize-model")
def resize_model(
    size: Annotated[int, typer.Option(help="Input size in px the copy embeds every image at.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory to write (MODEL too).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model directory or backbone name.")
    ] = "efficientnet_lite2",
    overwrite: OverwriteOpt = False,
) -> None:
    """Copy of a model that embeds at another input size with the same weights: a trained
    model often retrieves better at a higher one than it trained at (the CPU recipe: 384 px;
    docs/benchmarks/retrieval.md). Its vectors are a new embedding space: index again."""
    from snapshop.models.export import resize_model as resize

    card = run(lambda: resize(model, size, out_dir, overwrite=overwrite))
    out.print(f"wrote {out_dir} ({card.model_id}, {card.input_size} px)")


@app.command("merge-models")
def merge_models(
    models: Annotated[
        list[str],
        typer.Argument(help="Two or more model directories (or backbone names), one input size."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """One model that embeds with every MODEL and returns their ensemble vector (the mean of
    their cosines): more accurate than each member, one embedding per member per image
    (docs/benchmarks/retrieval.md, "Two backbones as one model"). Index again with it."""
    from snapshop.models.ensemble import merge_models as merge

    card = run(lambda: merge(models, out_dir, overwrite=overwrite))
    out.print(f"wrote {out_dir} ({card.model_id}, {card.output_dim}-d, {card.input_size} px)")


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
    from snapshop.evaluate.detection import detector_to_evaluate
    from snapshop.evaluate.detection import evaluate_detector as evaluate_boxes

    det = run(lambda: detector_to_evaluate(detector))
    with progress_bar("detecting") as (_, advance):
        report = run(lambda: evaluate_boxes(boxes, det, images_root, iou_threshold=iou,
                                            limit=limit, progress=advance))  # fmt: skip
    data = report.to_dict()
    if json_out:
        run(lambda: _write_json(json_out, data))
    if as_json:
        _print_json(data)
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
        err.print(Text.assemble(("skipped", "yellow"), f" {path}: {reason}"), highlight=False)


# --- detection: garment-segmenter training (issue #4) ---------------------------------------
@app.command("train-detector")
def train_detector(
    dataset: Annotated[
        Path, typer.Argument(help="CCP-format folder (manifest.csv, masks/, mask_labels.csv).")
    ],
    parity: Annotated[str, typer.Option(help="Image ids to train on: even, odd or all.")] = "even",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the model into.")] = Path(
        "garment_seg_model"
    ),
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 3e-3,
    width: int = 48,
    dropout: float = 0.3,
    dress_weight: Annotated[float, typer.Option(help="Loss weight of dress.")] = 1.0,
    long_side: int = 320,
    limit: Annotated[int | None, typer.Option(help="Only the first N photos.")] = None,
    negatives: Annotated[int, typer.Option(help="Synthetic person-free images.")] = 60,
    seed: int | None = None,
    cache: Annotated[Path | None, typer.Option(help="Trunk feature cache (.pkl).")] = None,
    prefix: Annotated[str, typer.Option(help="File name prefix of the written files.")] = "",
    tags: Annotated[
        Path | None,
        typer.Option(
            help="ccp-tags tags.csv: self-train on these photos, pseudo-labelled"
            " under their tags by --teacher or by a model first trained here."
        ),
    ] = None,  # fmt: skip
    teacher: Annotated[
        Path | None, typer.Option(help="Segmenter card (garment_seg.json) that labels --tags.")
    ] = None,
    pseudo_labels: Annotated[
        Path | None, typer.Option(help="Pseudo-label folder written by an earlier --tags run.")
    ] = None,
    finetune_blocks: Annotated[
        int, typer.Option(help="Train the stem + blocks 0..N-1 with the head (0: frozen trunk).")
    ] = 0,
    body_channels: Annotated[
        bool | None,
        typer.Option(
            "--body-channels/--no-body-channels",
            help="Pose prior: BlazePose body channels as head inputs (frozen trunk only).",
        ),
    ] = None,
    trunk: Annotated[
        str | None,
        typer.Option(help="Backbone the head reads: efficientnet_lite0 (default) or _lite2."),
    ] = None,
    # The options below apply with --finetune-blocks N only (None: FinetuneConfig's default).
    device: Annotated[str | None, typer.Option(help="auto, cuda or cpu.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    trunk_lr: Annotated[float | None, typer.Option(help="Lr of the fine-tuned blocks.")] = None,
    weight_decay: float | None = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw or sgd.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine or step.")] = None,
    min_scale: Annotated[float | None, typer.Option(help="Random rescale range.")] = None,
    max_scale: float | None = None,
    jitter: Annotated[float | None, typer.Option(help="Colour jitter strength.")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="Autocast on cuda.")] = None,
    max_train_seconds: Annotated[
        float | None, typer.Option(help="Stop after the epoch that ends past this.")
    ] = None,
    warmup_fraction: Annotated[
        float | None, typer.Option(help="Share of the steps with a rising learning rate.")
    ] = None,
    overlay_dtype: Annotated[
        str | None, typer.Option(help="float32 or float16: storage of the trunk tensors.")
    ] = None,
    recolour: Annotated[
        float | None, typer.Option(help="Chance per sample of a new colour per garment class.")
    ] = None,
    aux_labels: Annotated[
        bool | None,
        typer.Option(
            "--aux-labels/--no-aux-labels",
            help="Also train skin, hair, legwear, footwear, bag, belt (folded into other).",
        ),
    ] = None,
    copy_paste: Annotated[
        float | None,
        typer.Option(
            help="Copy-paste: another labelled person pasted in; composites per photo"
            " (head), chance per sample (with --finetune-blocks)."
        ),
    ] = None,
) -> None:
    """Train the `segmenter` garment detector on CCP pixel labels (head on the frozen trunk, or
    end to end with --finetune-blocks N); load the result with --detector segmenter:OUT.
    `snapshop -v train-detector ...` logs every epoch."""
    from snapshop.detect.segmenter import CARD_FILE
    from snapshop.train.segmenter import detector_training
    from snapshop.train.segmenter import train_detector as train_segmenter

    settings = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, width=width, dropout=dropout,
        dress_weight=dress_weight, long_side=long_side, negatives=negatives, seed=seed,
        device=device, workers=workers, trunk_lr=trunk_lr, weight_decay=weight_decay,
        optimizer=optimizer, schedule=schedule, min_scale=min_scale, max_scale=max_scale,
        jitter=jitter, augment=augment, bf16=bf16, max_train_seconds=max_train_seconds,
        warmup_fraction=warmup_fraction, overlay_dtype=overlay_dtype, recolour=recolour,
        aux_labels=aux_labels, copy_paste=copy_paste, body_channels=body_channels,
        trunk=trunk,
    )  # fmt: skip
    job = run(lambda: detector_training(
        dataset, finetune_blocks=finetune_blocks, settings=settings, out=out_dir, parity=parity,
        limit=limit, prefix=prefix, cache=cache, pseudo_labels=pseudo_labels, tags=tags,
        teacher=teacher,
    ))  # fmt: skip
    card = run(lambda: train_segmenter(job))
    out.print(f"wrote {job.out / (job.prefix + CARD_FILE)} (final loss"
              f" {card['training']['final_loss']})")  # fmt: skip


def entrypoint() -> None:  # pragma: no cover
    sys.exit(app())


# --- shop features (issue #18): more like this, similar-product export, duplicates -----------
@app.command()
def similar(
    product: Annotated[str, typer.Argument(help="Product sku (or integer id).")],
    catalog: CatalogOpt,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Products per result list.")] = 10,
    position: Annotated[
        str | None, typer.Option(help="Only item-based results at this garment position.")
    ] = None,
    category: Annotated[str | None, typer.Option(help="Only products of this category.")] = None,
    min_price: Annotated[float | None, typer.Option(min=0)] = None,
    max_price: Annotated[float | None, typer.Option(min=0)] = None,
    as_json: JsonOpt = False,
) -> None:
    """More like this: the products that look like PRODUCT, from its stored vectors."""
    from snapshop.search import ProductFilter

    result = run(lambda: api.similar(
        catalog, product, k=k, position=position,
        filters=ProductFilter(category, min_price, max_price),
    ))  # fmt: skip
    if as_json:
        _print_json(result.to_dict())
        return
    if position is None:
        out.print(_hits_table(f"More like {product} (image-based)", result.image_results))
    for item in result.item_results:
        out.print(_hits_table(f"More like {product}: {item.position} (item-based)",
                              item.results))  # fmt: skip


@app.command()
def recommend(
    catalog: CatalogOpt,
    output: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="similar.csv, similar.jsonl, or similar.parquet (needs pyarrow)."
        ),
    ],
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Similar products each.")] = 20,
    position: Annotated[
        str | None, typer.Option(help="Rank by the product vectors of this garment position.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=65536)] = 1024,
    restart: Annotated[
        bool, typer.Option("--restart", help="Start over instead of resuming an unfinished run.")
    ] = False,
    raw_csv: RawCsvOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export every product's k most similar products (by product vector); resumable."""
    with _count_bar("products") as (set_total, advance):
        report = run(lambda: api.recommend(
            catalog, output, k=k, position=position, batch_size=batch_size, restart=restart,
            spreadsheet_safe=not raw_csv, progress_total=set_total, progress=advance,
        ))  # fmt: skip
    if as_json:
        _print_json(report.to_dict())
        return
    after = report.resumed_after
    resumed = "" if after is None else f" (resumed after product {after})"
    out.print(f"wrote {report.rows} rows for {report.products} products to {report.path}{resumed};"
              f" {report.seconds:.1f} s ({report.products_per_second:.0f} products/s)")  # fmt: skip


@contextmanager
def _count_bar(unit: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(set_total, advance) callbacks; a live bar counting ``unit`` only on a terminal."""
    if not err.is_terminal:
        yield (lambda total: None), (lambda n: None)
        return
    columns = (TextColumn(unit), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(unit, total=None)
        yield (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


@catalog_app.command("duplicates")
def catalog_duplicates(
    catalog: CatalogOpt,
    output: Annotated[Path, typer.Option("--out", "-o", help="CSV of the pairs to write.")],
    threshold: Annotated[
        float | None,
        typer.Option(min=-1.0, max=1.0, help="Vector similarity from which a pair is a candidate."),
    ] = None,
    pixel_threshold: Annotated[
        float | None,
        typer.Option(min=-1.0, max=1.0, help="Pixel similarity that confirms a candidate."),
    ] = None,
    pixel_check: Annotated[
        bool, typer.Option(help="Confirm candidates on the stored image files.")
    ] = True,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a page of side-by-side thumbnails.")
    ] = None,
    raw_csv: RawCsvOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Near-identical images listed under different products (reused photos, duplicates)."""
    with _count_bar("images") as (set_total, advance):
        report = run(lambda: api.duplicates(
            catalog, threshold=threshold, pixel_threshold=pixel_threshold,
            pixel_check=pixel_check, out=output, html=html, spreadsheet_safe=not raw_csv,
            progress_total=set_total, progress=advance,
        ))  # fmt: skip
    if as_json:
        _print_json(report.to_dict())
        return
    pixel = report.pixel_threshold
    checked = "not checked" if pixel is None else f">= {pixel:g}"
    out.print(f"{len(report.pairs)} near-duplicate pairs among {report.images} images"
              f" (vector similarity >= {report.threshold:g}, pixels {checked}) -> {output}"
              + (f", {html}" if html else ""))  # fmt: skip


# --- snapshop db: a local PostgreSQL + pgvector ---------------------------------------------
DbDirOpt = Annotated[Path, typer.Option("--dir", help="Folder of the database (created).")]


@db_app.command("start")
def db_start(
    directory: DbDirOpt,
    port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="TCP port on 127.0.0.1 (default: the last one if free, else a free one; "
            "0: a free one).",
        ),
    ] = None,
) -> None:
    """Start the server (initialising DIR on first use) and print its DSN.

    The server keeps running after this command returns, until `snapshop db stop --dir DIR`:
    `DSN=$(snapshop db start --dir pg)`.
    """
    from snapshop.dbserver import start_database

    out.print(run(lambda: start_database(directory, port)), highlight=False, soft_wrap=True)


@db_app.command("stop")
def db_stop(directory: DbDirOpt) -> None:
    """Stop the server of DIR (fast shutdown); harmless when it is not running."""
    from snapshop.dbserver import stop_database

    stopped = run(lambda: stop_database(directory))
    out.print("stopped" if stopped else "not running", highlight=False)


@db_app.command("status")
def db_status(directory: DbDirOpt) -> None:
    """Print `running DSN` or `stopped`."""
    from snapshop.dbserver import database_status

    status = run(lambda: database_status(directory))
    out.print(f"running {status.dsn}" if status.running else "stopped", highlight=False,
              soft_wrap=True)  # fmt: skip
