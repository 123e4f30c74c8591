"""Peak memory of the search service under concurrent searches of a very large photo.

Builds a small generated catalog (demo garments, EfficientNet-Lite0, the default detector),
then per row starts a fresh `snapshop serve` on 127.0.0.1 (a free port) with the code this
interpreter imports (set PYTHONPATH to choose a checkout), sends one small warm-up search,
then --rounds times fires --clients concurrent POST /v1/search of one photo (a 0.3-Mpx JPEG:
the cost of concurrency alone; a --megapixels PNG and JPEG), while a thread samples the
resident memory of the service process and its children every 20 ms. Prints a table: RSS
after warm-up, peak RSS, and the growth.

    PYTHONPATH=src python benchmarks/memory_probe.py            # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/memory_probe.py   # e.g. before a change
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from load_search import free_port, wait_ready
from PIL import Image

SAMPLE_SECONDS = 0.02


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (0 for a process that ended)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class PeakSampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def build_catalog(root: Path) -> Path:
    from snapshop import api
    from snapshop.demo import demo_products, render

    shop = root / "shop"
    for n, product in enumerate(demo_products(12, seed=3)):
        (shop / product.sku).mkdir(parents=True)
        for j in range(2):
            render(product, n * 10 + j, size=256).save(shop / product.sku / f"{j}.jpg")
    api.index_source(shop, root / "cat", model="efficientnet_lite0", workers=0)
    return root / "cat"


def big_photo(megapixels: float, fmt: str) -> bytes:
    """A smooth ``megapixels`` photo of a demo garment (upscaled: it compresses like a photo
    would, staying under the upload limit)."""
    from snapshop.demo import demo_products, render

    height = int(math.sqrt(megapixels * 1e6 * 2 / 3))
    width = int(megapixels * 1e6 / height)
    image = render(demo_products(12, seed=3)[5], 999, size=600).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def fire(url: str, name: str, data: bytes, clients: int) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            r = httpx.post(f"{url}/v1/search", files={"image": (name, data)}, timeout=300)
            status = r.status_code
        except httpx.HTTPError:
            status = -1
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def measure(
    catalog: Path, fmt: str, megapixels: float, clients: int, rounds: int
) -> tuple[str, float, int, int, int, list[int]]:
    """(format, megapixels, upload bytes, RSS after warm-up, peak RSS, statuses) of a fresh
    service under ``rounds`` x ``clients`` concurrent searches of one photo."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "SNAPSHOP_API_KEY"}
    serve = ["serve", "--catalog", str(catalog), "--port", str(port), "--max-upload-mb", "100"]
    cmd = [sys.executable, "-c", "from snapshop.cli import app; app()", *serve]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(url, proc)
        data = big_photo(megapixels, fmt)
        small = io.BytesIO()
        Image.new("RGB", (320, 320), (200, 40, 40)).save(small, "JPEG")
        fire(url, "warm.jpg", small.getvalue(), 1)  # models loaded, caches warm
        before = rss_bytes(proc.pid)
        statuses: list[int] = []
        with PeakSampler(proc.pid) as sampler:
            for _ in range(rounds):
                statuses += fire(url, f"photo.{fmt.lower()}", data, clients)
        return fmt, megapixels, len(data), before, sampler.peak, statuses
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--megapixels", type=float, default=40.0)
    args = parser.parse_args()

    import snapshop
    from snapshop import images

    slots = images.decode_slots() if hasattr(images, "decode_slots") else "unbounded"
    with tempfile.TemporaryDirectory(prefix="memprobe-") as tmp:
        root = Path(tmp)
        catalog = build_catalog(root)
        photos = [("JPEG", 0.3), ("PNG", args.megapixels), ("JPEG", args.megapixels)]
        rows = [measure(catalog, fmt, mpx, args.clients, args.rounds) for fmt, mpx in photos]

    mb = 1024 * 1024
    print(f"snapshop from {Path(snapshop.__file__).parent}; decode slots: {slots}")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" load {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{args.clients} concurrent searches x {args.rounds} rounds, a fresh service per row\n")
    print("| photo | upload MB | RSS before MB | peak RSS MB | growth MB | statuses |")
    print("|---|---|---|---|---|---|")
    for fmt, mpx, size, before, peak, statuses in rows:
        codes = ", ".join(f"{s}x{statuses.count(s)}" for s in sorted(set(statuses)))
        print(
            f"| {mpx:g} Mpx {fmt} | {size / mb:.1f} | {before / mb:.0f} | {peak / mb:.0f} |"
            f" {(peak - before) / mb:.0f} | {codes} |"
        )


if __name__ == "__main__":
    main()
