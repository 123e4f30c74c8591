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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from snapshop import api
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
    str | None, typer.Option("--detector", help="Garment detector: none, pose, yolo:FILE.onnx, ...")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def run(fn: Callable[[], T]) -> T:
    """Call ``fn``; user errors become a one-line message and a non-zero exit code."""
    try:
        return fn()
    except (ConfigError, ManifestError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except SnapshopError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


@contextmanager
def progress_bar(description: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(set_total, advance) callbacks; a live bar only on a terminal."""
    if not err.is_terminal:
        yield (lambda total: None), (lambda n: None)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err) as bar:  # fmt: skip
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
    as_json: JsonOpt = False,
) -> None:
    """Add a folder or CSV manifest to a catalog (created on first use); re-runs are idempotent."""
    with progress_bar("indexing") as (set_total, advance):
        report = run(lambda: api.index_source(
            source, catalog, model=model, detector=detector, batch_size=batch_size, sync=sync,
            progress_total=set_total, progress=advance,
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
            err.print(f"  [yellow]skipped[/yellow] {source_path}: {reason}", highlight=False)
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


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the demo.")] = Path(
        "demo-catalog"
    ),
    k: Annotated[int, typer.Option("-k", min=1, max=50)] = 5,
    model: ModelOpt = None,
) -> None:
    """Generate a small demo catalog, index it and search it with an unseen photo."""
    from snapshop.demo import generate_demo_catalog

    manifest, queries = generate_demo_catalog(directory / "source")
    out.print(f"demo catalog source: {manifest} ({len(queries)} products)")
    with progress_bar("indexing demo") as (set_total, advance):
        report = run(lambda: api.index_source(manifest, directory / "catalog", model=model,
                                              progress_total=set_total, progress=advance))  # fmt: skip
    out.print(f"indexed {report.added} new images, {report.skipped} already there,"
              f" {report.seconds:.1f} s")  # fmt: skip
    hits_at_1 = 0
    for n, (query, sku) in enumerate(queries):
        result = run(lambda q=query: api.search_image(q, directory / "catalog", k=k))
        hits_at_1 += bool(result.image_results) and result.image_results[0].sku == sku
        if n == 0:
            out.print(f"query: {query} (a new photo of {sku})")
            out.print(_hits_table("Similar images", result.image_results))
            out.print(f"[dim]search {result.timings_ms['total']:.1f} ms[/dim]")
    out.print(f"recall@1 over {len(queries)} held-out demo photos: {hits_at_1 / len(queries):.2f}")


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
    as_json: JsonOpt = False,
) -> None:
    """Recall@K, mAP@R, embed ms/image and search ms/query of one or more models."""
    from snapshop.data.manifest import parse_where
    from snapshop.evaluate.retrieval import DEFAULT_KS, evaluate_manifest

    cutoffs = tuple(sorted(set(ks))) if ks else DEFAULT_KS
    reports = []
    for m in model or [None]:
        reports.append(run(lambda m=m: evaluate_manifest(
            manifest, m, cutoffs, run(lambda: parse_where(query_where)),
            run(lambda: parse_where(gallery_where)),
        )))  # fmt: skip
    data = [r.to_dict() for r in reports]
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table(title=f"{manifest}: {reports[0].n_queries} queries, {reports[0].n_gallery} gallery,"
                        f" {reports[0].n_products} products")  # fmt: skip
    table.add_column("metric")
    for r in reports:
        table.add_column(r.name)
    for k in cutoffs:
        table.add_row(f"R@{k}", *(f"{r.recall[k]:.4f}" for r in reports))
    table.add_row("mAP@R", *(f"{r.map_at_r:.4f}" for r in reports))
    table.add_row("embed ms/image", *(f"{r.embed_ms_per_image:.1f}" for r in reports))
    table.add_row("search ms/query", *(f"{r.search_ms_per_query:.3f}" for r in reports))
    out.print(table)
    for r in reports:
        for path, reason in r.skipped[:10]:
            err.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False)


def entrypoint() -> None:  # pragma: no cover
    sys.exit(app())
