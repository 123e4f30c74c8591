"""The cost of a flat index file's CRC-32 (docs/benchmarks/reliability.md, fourth round's
"Left open"): the steps of saving an N x 512 flat index (faiss writes the file, the CRC-32
pass reads it back, fsync) and its load with and without the check, the file in the page
cache as after a save. Whole saves are not compared: their faiss write varies by seconds
with the disk's write-back, far more than the CRC-32 pass costs.

    python benchmarks/index_checksum.py --n 1000000 --dir /tmp --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

import snapshop.index.flat as flat
from snapshop.index.base import crc32_of_file

DIM = 512


def ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    index = flat.FlatIndex(DIM)
    rng = np.random.default_rng(0)
    for lo in range(0, args.n, 100_000):
        rows = min(100_000, args.n - lo)
        index.add(np.arange(lo, lo + rows), rng.standard_normal((rows, DIM), dtype=np.float32))
    path = args.dir / f"checksum-{args.n}.faiss"
    steps: dict[str, list[float]] = {"faiss write": [], "fsync": [], "CRC-32 pass": []}
    loads: dict[str, list[float]] = {"faiss read": [], "FlatIndex.load (read + CRC-32)": []}
    try:
        for _ in range(args.repeats):  # the steps of a save, as write_faiss_atomic takes them
            steps["faiss write"].append(ms(lambda: faiss.write_index(index._index, str(path))))
            with open(path, "rb") as fh:
                steps["CRC-32 pass"].append(ms(lambda: crc32_of_file(fh)))  # noqa: B023
                steps["fsync"].append(ms(lambda: os.fsync(fh.fileno())))  # noqa: B023
        size = path.stat().st_size / 2**30
        for _ in range(args.repeats):
            loads["faiss read"].append(ms(lambda: faiss.read_index(str(path))))
            loads["FlatIndex.load (read + CRC-32)"].append(ms(lambda: flat.FlatIndex.load(path)))
    finally:
        path.unlink(missing_ok=True)
    print(f"{args.n:,} x {DIM} flat index, file {size:.2f} GiB; ms over {args.repeats} runs")
    print("| step | median | min | max |")
    print("|---|---|---|---|")
    for name, times in {**steps, **loads}.items():
        print(f"| {name} | {statistics.median(times):.0f} | {min(times):.0f} | {max(times):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
