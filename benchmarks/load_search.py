"""Load check for the search service: concurrent POST /v1/search on loopback.

Starts `snapshop serve` on 127.0.0.1 (a free port) over CATALOG, unless --url points at a
running service, then N client threads send query photos until --requests are done or
--duration seconds pass (both bounded). Prints latency percentiles and throughput.

    python benchmarks/load_search.py --catalog /tmp/cat --queries manifest.csv --clients 4

`--write-catalog-csv OUT --queries ../shared/datasets/grocery-dev/manifest.csv` instead
writes a `snapshop index` manifest pointing at every grocery-dev image (absolute paths, never
copies), with a deterministic made-up price per product, and exits.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from snapshop.images import IMAGE_SUFFIXES

MAX_REQUESTS = 5000
MAX_DURATION_S = 600.0


def query_files(source: Path, limit: int) -> list[Path]:
    """Query photos: every image under a folder, or the `path` rows of a CSV manifest with
    role=query when it has a role column."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        with open(source, newline="") as fh:
            rows = list(csv.DictReader(fh))
        col = "path" if rows and "path" in rows[0] else "image_path"
        rows = [r for r in rows if r.get("role", "query") == "query"]
        files = [source.parent / r[col] for r in rows]
    if not files:
        raise SystemExit(f"{source}: no query images")
    step = max(1, len(files) // limit)  # spread over the whole set, deterministic
    return files[::step][:limit]


def write_catalog_csv(grocery_manifest: Path, out: Path) -> int:
    """grocery-dev manifest -> `snapshop index` CSV (all images; price made up per product)."""
    root = grocery_manifest.resolve().parent
    with open(grocery_manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "image_path", "title", "price", "currency", "category"])
        for r in rows:
            h = int(hashlib.sha256(r["product_id"].encode()).hexdigest()[:6], 16)
            writer.writerow(
                [
                    r["product_id"],
                    root / r["path"],
                    r["product_name"].replace("-", " "),
                    f"{0.5 + (h % 900) / 100:.2f}",
                    "EUR",
                    r["category"],
                ]
            )
    return len(rows)


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(catalog: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("snapshop")
    cmd = [str(exe), "serve", "--catalog", str(catalog), "--port", str(port), *extra]
    env = {k: v for k, v in os.environ.items() if k != "SNAPSHOP_API_KEY"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise SystemExit(f"server exited ({proc.returncode}): {err[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


def run_load(
    url: str | list[str],
    files: list[Path],
    clients: int,
    requests: int,
    duration: float,
    k: int,
    warmup: int,
) -> dict[str, Any]:
    """``clients`` threads posting searches until ``requests`` are done or ``duration``
    seconds pass; with several ``url`` (replicas), client i posts to ``url[i % len(url)]``."""
    urls = [url] if isinstance(url, str) else list(url)
    payloads = [(p.name, p.read_bytes()) for p in files]
    with httpx.Client(timeout=60) as c:  # warm-up: first requests load caches and pools
        for target in urls:
            for name, data in payloads[:warmup]:
                c.post(f"{target}/v1/search", files={"image": (name, data)}, data={"k": str(k)})
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    server_ms: list[dict[str, float]] = []
    statuses: dict[int, int] = {}
    stop_at = time.monotonic() + duration

    def client(i: int) -> None:
        url = urls[i % len(urls)]
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop_at:
                n = next(counter)
                if n >= requests:
                    return
                name, data = payloads[n % len(payloads)]
                t0 = time.perf_counter()
                try:
                    r = c.post(
                        f"{url}/v1/search", files={"image": (name, data)}, data={"k": str(k)}
                    )
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(dt)
                        server_ms.append(r.json()["timings_ms"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    mean_server = {
        key: float(np.mean([s.get(key, 0.0) for s in server_ms])) if server_ms else float("nan")
        for key in ("decode", "detect", "embed", "search", "total")
    }
    return {
        "clients": clients,
        "ok": len(latencies),
        "errors": sum(v for s, v in statuses.items() if s != 200),
        "statuses": statuses,
        "wall_s": wall,
        "throughput": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "mean": float(lat.mean()),
        "server": mean_server,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--catalog", type=Path, help="catalog to serve (omit with --url)")
    ap.add_argument("--url", help="an already running service, e.g. http://127.0.0.1:8000")
    ap.add_argument("--queries", type=Path, required=True, help="folder of photos or CSV manifest")
    ap.add_argument("--max-queries", type=int, default=200)
    ap.add_argument("--clients", type=int, nargs="+", default=[4])
    ap.add_argument("--requests", type=int, default=200, help="per client-count run")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds cap per run")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument")
    ap.add_argument("--write-catalog-csv", type=Path, help="write an index CSV and exit")
    args = ap.parse_args()
    if args.write_catalog_csv:
        n = write_catalog_csv(args.queries, args.write_catalog_csv)
        print(f"wrote {args.write_catalog_csv}: {n} images")
        return
    requests = min(args.requests, MAX_REQUESTS)
    duration = min(args.duration, MAX_DURATION_S)
    files = query_files(args.queries, args.max_queries)

    proc = None
    if args.url:
        url = args.url.rstrip("/")
        if not url.startswith(("http://127.0.0.1", "http://localhost")):
            raise SystemExit("load tests run on loopback only")
    else:
        if args.catalog is None:
            raise SystemExit("give --catalog or --url")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args.catalog, port, args.serve_arg)
    try:
        wait_ready(url, proc)
        stats = httpx.get(f"{url}/v1/stats", timeout=10).json()
        print(
            f"# catalog: {stats['products']} products, {stats['images']} images,"
            f" {stats['crops']} crops; index {stats['index_kind']}; model {stats['model_id']};"
            f" detector {stats['detector']}"
        )
        print(
            f"# queries: {len(files)} photos from {args.queries}; k={args.k};"
            f" bounded by {requests} requests or {duration:.0f} s per run"
        )
        print(
            f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores;"
            f" load average before: {load()}"
        )
        rows = [
            run_load(url, files, c, requests, duration, args.k, args.warmup) for c in args.clients
        ]
        print()
        print(
            "| clients | requests ok | errors | p50 ms | p95 ms | p99 ms | mean ms | req/s |"
            " server embed ms | server search ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            s = r["server"]
            print(
                f"| {r['clients']} | {r['ok']} | {r['errors']} | {r['p50']:.1f} | {r['p95']:.1f}"
                f" | {r['p99']:.1f} | {r['mean']:.1f} | {r['throughput']:.2f}"
                f" | {s['embed']:.1f} | {s['search']:.1f} |"
            )
        print(f"\n# load average after: {load()}")
        bad = [r["statuses"] for r in rows if r["errors"]]
        if bad:
            print(f"# non-200 statuses: {bad}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
