"""Writers of one directory catalog that wait for each other, measured three ways.

1. **hand-over**: another process takes the write lock again at once after each hold of
   ``--hold`` s; a writer that waits at most ``--wait`` s tries ``--writes`` times: how many
   get the lock, and the longest wait.
2. **busy writes**: another process holds the lock throughout; ``--busy`` writes that wait
   10 ms each give up: the threads and file descriptors this process holds before and after.
3. **reads beside saves**: one process commits and saves the index files in a loop for
   ``--seconds`` s while another opens the catalog again and again: how many opens took a
   sound index file for damaged and rebuilt it from the store.

    python benchmarks/write_waits.py --writes 20 --hold 0.1 --wait 1 --busy 300 --seconds 20

The code before the seventh and eighth rounds: ``git checkout 480ea56 -- src`` first.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from snapshop.catalog.catalog import create_catalog, open_catalog
from snapshop.errors import CatalogBusyError

DIM = 128


def _sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _add(catalog: Any, n: int, rng: np.random.Generator) -> None:
    vector = rng.standard_normal(DIM).astype(np.float32)
    vector /= np.linalg.norm(vector)
    with catalog.writing() as write:
        product = write.upsert_product(f"p{n % 100}")
        write.insert_image(product, source=f"{n}.jpg", blob=None, sha256=_sha(n), width=1,
                           height=1, vector=vector)  # fmt: skip


def _relock(directory: Path, hold: float, stop: float, ready: Any) -> None:
    """Another process: the write lock held ``hold`` s, taken again at once, until ``stop``."""
    with open_catalog(directory) as catalog:
        ready.set()
        while time.time() < stop:
            with catalog.write_lock():
                time.sleep(hold)


def hand_over(directory: Path, writes: int, hold: float, wait: float) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(
        target=_relock, args=(directory, hold, time.time() + 600, ready), daemon=True
    )
    holder.start()
    ready.wait(60)
    got, longest = 0, 0.0
    try:
        with open_catalog(directory) as catalog:
            catalog.write_wait_s = wait
            for _ in range(writes):
                start = time.monotonic()
                try:
                    with catalog.write_lock():
                        got += 1
                        longest = max(longest, time.monotonic() - start)
                except CatalogBusyError:
                    pass
    finally:
        holder.terminate()
        holder.join(30)
    return got, longest


def _hold(directory: Path, ready: Any, release: Any) -> None:
    with open_catalog(directory) as catalog, catalog.write_lock():
        ready.set()
        release.wait(600)


def busy_writes(directory: Path, busy: int) -> tuple[int, int, int, int, int]:
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(directory, ready, release), daemon=True)
    holder.start()
    ready.wait(60)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    failed = 0
    try:
        with open_catalog(directory) as catalog:
            catalog.write_wait_s = 0.01
            threads_before, fds_before = threading.active_count(), fds()
            for _ in range(busy):
                try:
                    with catalog.write_lock():
                        pass
                except CatalogBusyError:
                    failed += 1
            threads_after, fds_after = threading.active_count(), fds()
    finally:
        release.set()
        holder.join(30)
    return failed, threads_before, threads_after, fds_before, fds_after


def _save_loop(directory: Path, stop: float, out: Any) -> None:
    rng = np.random.default_rng(1)
    saves = 0
    with open_catalog(directory) as catalog:
        while time.time() < stop:
            with catalog.write_lock():
                _add(catalog, 10**7 + saves, rng)
                catalog.save_indexes(measure=False)
            saves += 1
    out.put(("saves", saves))


def _open_loop(directory: Path, stop: float, out: Any) -> None:
    rebuilt = opens = 0

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal rebuilt
            rebuilt += "rebuilding" in record.getMessage()

    logging.getLogger("snapshop").addHandler(Count())
    logging.getLogger("snapshop").setLevel(logging.INFO)
    while time.time() < stop:
        open_catalog(directory).close()
        opens += 1
    out.put(("opens", opens, rebuilt))


def reads_beside_saves(directory: Path, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = time.time() + seconds
    procs = [ctx.Process(target=target, args=(directory, stop, out), daemon=True)
             for target in (_save_loop, _open_loop)]  # fmt: skip
    for proc in procs:
        proc.start()
    found = {}
    for _ in procs:
        item = out.get(timeout=seconds + 120)
        found[item[0]] = item[1:]
    for proc in procs:
        proc.join(30)
    return {"saves": found["saves"][0], "opens": found["opens"][0],
            "rebuilt": found["opens"][1]}  # fmt: skip


def build(directory: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    catalog = create_catalog(directory, model_id="bench@000000000000", model_ref="bench",
                             dim=DIM, index_kind="flat")  # fmt: skip
    try:
        with catalog.write_lock():
            for i in range(n):
                _add(catalog, i, rng)
            catalog.save_indexes(measure=False)
    finally:
        catalog.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="catalog size for part 3")
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--hold", type=float, default=0.1)
    parser.add_argument("--wait", type=float, default=1.0)
    parser.add_argument("--busy", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: /tmp)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        build(root / "catalog", args.images)
        got, longest = hand_over(root / "catalog", args.writes, args.hold, args.wait)
        failed, t0, t1, f0, f1 = busy_writes(root / "catalog", args.busy)
        race = reads_beside_saves(root / "catalog", args.seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| measure | value |\n|---|---|")
    print(f"| hand-over: writes that got the lock (holds {args.hold:g} s, wait {args.wait:g} s)"
          f" | {got} of {args.writes}, longest wait {longest:.3f} s |")  # fmt: skip
    print(f"| busy writes: threads / descriptors before → after {failed} busy writes"
          f" | {t0} / {f0} → {t1} / {f1} |")  # fmt: skip
    print(f"| reads beside saves: opens that rebuilt a sound index ({race['saves']} saves in"
          f" {args.seconds:g} s) | {race['rebuilt']} of {race['opens']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
