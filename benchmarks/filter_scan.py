"""Where a filtered exact scan spends its time: the allowed rows of a memory-mapped float
file gathered then scored, against scored in place (issue #15, filtered search at 1 %).

Spectral synthetic vectors (``index_latency.spectral``) are written to a temporary ``.npy``
and memory-mapped, as the compressed index kinds keep them; a random sorted subset of rows
(the allowed set) is scored against one query at a time.

    python benchmarks/filter_scan.py --n 1000000 --dim 512 --fraction 0.01
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from index_latency import spectral

from snapshop.index.filtering import (
    exact_top_k,
    exact_top_k_at,
    inner_products,
    inner_products_at,
    omp_threads,
)


def p50(fn: Callable[[int], Any], reps: int) -> tuple[float, float]:
    fn(0)
    lat = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        lat.append((time.perf_counter() - t) * 1e3)
    return float(np.median(lat)), float(np.percentile(lat, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--fraction", type=float, nargs="+", default=[0.01])
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    n, dim = args.n, args.dim
    queries = spectral(50, dim, seed=2, n_clusters=max(10, n // 100))
    with tempfile.TemporaryDirectory(prefix="snapshop-scan-") as tmp:
        path = Path(tmp) / "vectors.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        out[:] = spectral(n, dim, seed=1, n_clusters=max(10, n // 100))
        out.flush()
        del out
        store = np.load(path, mmap_mode="r")
        labels = np.arange(n, dtype=np.int64)
        print(f"{n:,} x {dim}, faiss {faiss.__version__}, one query at a time, {args.reps} reps")
        print("\n| allowed | step | p50 ms | p99 ms |\n|---|---|---|---|")
        for fraction in args.fraction:
            rng = np.random.default_rng(0)
            rows = np.sort(rng.choice(n, int(fraction * n), replace=False)).astype(np.int64)
            for line in table(store, labels, queries, rows, args.reps):
                print(line, flush=True)


def table(
    store: np.ndarray, labels: np.ndarray, queries: np.ndarray, rows: np.ndarray, reps: int
) -> list[str]:
    gathered = np.asarray(store[rows])
    start = len(store) // 3
    block = slice(start, start + len(rows))
    steps: list[tuple[str, Callable[[int], Any]]] = [
        ("gather the rows (store[rows])", lambda i: np.asarray(store[rows])),
        ("score gathered rows", lambda i: inner_products(gathered, queries[i % 50, None])),
        (
            "gather + score + top-40 (before)",
            lambda i: exact_top_k(np.asarray(store[rows]), labels[rows], queries[i % 50, None], 40),
        ),
        (
            "score in place, 2 OpenMP threads",
            lambda i: _by_idx_threads(store, rows, queries[i % 50], 2),
        ),
        (
            "score in place, 1 thread",
            lambda i: inner_products_at(store, rows, queries[i % 50, None]),
        ),
        (
            "score in place + top-40 (now)",
            lambda i: exact_top_k_at(store, rows, labels[rows], queries[i % 50, None], 40),
        ),
        (
            "contiguous slice + top-40 (a partition)",
            lambda i: exact_top_k(
                np.asarray(store[block]), labels[block], queries[i % 50, None], 40
            ),
        ),
    ]
    out = []
    for name, fn in steps:
        med, p99 = p50(fn, reps)
        out.append(f"| {len(rows):,} | {name} | {med:.2f} | {p99:.2f} |")
    return out


def _by_idx_threads(
    store: np.ndarray, rows: np.ndarray, query: np.ndarray, threads: int
) -> np.ndarray:
    out = np.empty(len(rows), np.float32)
    query = np.ascontiguousarray(query)
    with omp_threads(threads):
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(out),
            faiss.swig_ptr(query),
            faiss.swig_ptr(store),
            faiss.swig_ptr(rows),
            store.shape[1],
            1,
            len(rows),
        )
    return out


if __name__ == "__main__":
    main()
