"""Training speed under the two allocator policies of snapshop.allocator.

Runs the CPU recipe's `snapshop train` (Lite2, last 4 blocks, cached views) on one manifest
once per policy, each in a fresh process on the same cached views with the same seed:
"serving" (SNAPSHOP_KEEP_FREED_MEMORY=0: every block of 1 MiB or more mapped and returned
when freed, what training did before) and "training" (the default: freed memory kept for
reuse). Prints, per policy, the seconds of each trained epoch after the warm-up, the page
faults and the system's share of CPU time, peak resident memory, and the last epoch's loss,
which must be equal: the allocator changes where tensors live, not what they hold.

    python benchmarks/train_allocator.py runs/grocery-cv/fold0.csv \
        --cache-dir runs/grocery-cv/cache_s1_0 --seed 1          # ≈ 6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"serving (1 MiB maps)": "0", "training (kept, default)": "1"}
RECIPE = [
    "--lr-step", "5", "--views", "4", "--train-blocks", "4",
    "--repeat-where", "domain=iconic", "--repeat", "21", "--catalog-domain",
    "--embed-size", "384",
]  # fmt: skip


# runs the command given and prints its resource use: one child's own peak memory
MEASURED = """
import json, resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([use.ru_utime, use.ru_stime, use.ru_minflt, use.ru_maxrss]))
"""


def run_policy(
    manifest: Path, out: Path, cache_dir: Path, seed: int, epochs: int, keep: str
) -> dict:
    snapshop = Path(sys.executable).parent / "snapshop"
    start = time.perf_counter()
    measured = subprocess.run(
        [sys.executable, "-c", MEASURED, str(snapshop), "train", "--manifest", str(manifest),
         "--out", str(out), "--cache-dir", str(cache_dir), "--seed", str(seed),
         "--epochs", str(epochs), *RECIPE],
        check=True, capture_output=True, text=True,
        env={**os.environ, "SNAPSHOP_KEEP_FREED_MEMORY": keep},
    )  # fmt: skip
    wall = time.perf_counter() - start
    user, system, faults, peak_kb = json.loads(measured.stdout)
    history = json.loads((out / "history.json").read_text())
    return {
        "epochs": [e["seconds"] for e in history if not e["warmup"]],
        "loss": history[-1]["loss"],
        "faults": faults,
        "system share": system / (user + system),
        "peak GB": peak_kb / 1e6,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--cache-dir", type=Path, required=True, help="shared cached views")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="the warm-up epoch included")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapshop-alloc-") as work:
        rows = {
            name: run_policy(
                args.manifest, Path(work) / keep, args.cache_dir, args.seed, args.epochs, keep
            )
            for name, keep in POLICIES.items()
        }
    print("| allocator policy | trained epochs, s | page faults | system share of CPU "
          "| peak RSS, GB | whole run, s | last loss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        epochs = " / ".join(f"{s:.0f}" for s in r["epochs"])
        print(f"| {name} | {epochs} | {r['faults']:,} | {r['system share']:.0%} "
              f"| {r['peak GB']:.2f} | {r['wall']:.0f} | {r['loss']:.6f} |")  # fmt: skip
    losses = {r["loss"] for r in rows.values()}
    print("same model:", "yes" if len(losses) == 1 else f"NO, losses {sorted(losses)}")


if __name__ == "__main__":
    main()
