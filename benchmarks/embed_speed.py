"""Embedding ms/image: ONNX Runtime bf16 / fp32 / static int8 (QDQ) vs torch eager, by batch.

    python benchmarks/embed_speed.py --model efficientnet_lite2 /tmp/lite2-int8 \
        --precision bf16 fp32 --torch efficientnet_lite2 --batch 1 3 32 [--threads 1]

``--model`` takes model directories or backbone names (ONNX Runtime, in each ``--precision``:
bf16 on the OpenVINO execution provider, fp32 on ONNX Runtime's CPU provider; an int8 model
runs on the latter whatever is asked); ``--torch`` backbone
names run as torch eager fp32 (``channels_last``, no grad). Inputs are preprocessed tensors
(decode excluded); the median of ``--repeats`` timed runs after one warm-up, wall clock and
the CPU time of the process (all threads: the work done, which other processes on a shared
machine disturb far less than the wall clock). ``--threads N`` sets ONNX Runtime's intra-op
threads (0: one per core). The last columns: the graph's FLOPs per image and the wall time
over the compute floor (FLOPs ÷ the machine's sgemm GFLOP/s, measured first).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from snapshop.models.embedder import load_embedder
from snapshop.models.flops import graph_flops, sgemm_gflops
from snapshop.models.runtime import PRECISIONS


def time_ms_per_image(fn: Callable[[], object], batch: int, repeats: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per image: medians of ``repeats`` runs after a warm-up."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t) * 1e3 / batch)
        cpu.append((time.process_time() - c) * 1e3 / batch)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=["efficientnet_lite2"])
    ap.add_argument("--torch", nargs="*", default=[])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    ap.add_argument(
        "--parallel",
        type=int,
        nargs="+",
        default=[-1],
        help="Embedder(parallel=N): -1 its default (one image per call, a call per core),"
        " 0 the whole batch in one call",
    )
    ap.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISIONS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    gflops = sgemm_gflops()
    print(
        f"sgemm {gflops:.0f} GFLOP/s, load average {os.getloadavg()[0]:.1f},"
        f" intra-op threads {args.threads or 'one per core'}"
    )
    print(
        "| engine | model | parallel | batch | ms/image | CPU ms/image | GFLOP/image | ms / floor |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    runs = [(m, p, q) for m in args.model for p in args.parallel for q in args.precision]
    for model, parallel, precision in runs:
        embedder = load_embedder(
            model,
            batch_size=max(args.batch),
            threads=args.threads or None,
            parallel=None if parallel < 0 else parallel,
            precision=precision,
        )
        size = embedder.input_size
        flop = graph_flops(embedder.model_dir / "model.onnx", {"images": (1, 3, size, size)})
        floor_ms = flop.gflop / gflops * 1e3
        for batch in args.batch:
            x = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
            reps = args.repeats if batch == 1 else max(3, args.repeats // 3)
            ms, cpu = time_ms_per_image(lambda x=x, e=embedder: e.embed_arrays(x), batch, reps)
            engine = f"onnxruntime {embedder.precision} ({embedder.card.kind})"
            print(
                f"| {engine} | {embedder.card.name} |"
                f" {embedder.parallel} | {batch} |"
                f" {ms:.1f} | {cpu:.1f} | {flop.gflop:.2f} | {ms / floor_ms:.1f}× |",
                flush=True,
            )
    if args.torch:
        import torch

        from snapshop.models.heads import create_embedding_net

        for backbone in args.torch:
            net = create_embedding_net(backbone, dim=None, pretrained=True).eval()
            net = net.to(memory_format=torch.channels_last)
            size = net.backbone.spec.input_size
            for batch in args.batch:
                x = torch.from_numpy(
                    rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
                ).contiguous(memory_format=torch.channels_last)
                reps = args.repeats if batch == 1 else max(3, args.repeats // 3)

                def run(x: torch.Tensor = x, net: torch.nn.Module = net) -> object:
                    with torch.no_grad():
                        return net(x)

                ms, cpu = time_ms_per_image(run, batch, reps)
                print(
                    f"| torch eager fp32 | {backbone} | – | {batch} | {ms:.1f} | {cpu:.1f} |"
                    " – | – |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
