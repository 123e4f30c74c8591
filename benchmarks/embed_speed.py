"""Embedding ms/image: ONNX Runtime fp32 / static int8 (QDQ) vs torch eager, batch 1 and 32.

    python benchmarks/embed_speed.py --model efficientnet_lite2 /tmp/lite2-int8 \
        --torch efficientnet_lite2 --batch 1 32

``--model`` takes model directories or backbone names (ONNX Runtime); ``--torch`` backbone
names run as torch eager fp32 (``channels_last``, no grad). Inputs are preprocessed tensors
(decode excluded); the median of ``--repeats`` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import numpy as np

from snapshop.models.embedder import load_embedder


def time_ms_per_image(fn: Callable[[], object], batch: int, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1e3 / batch)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=["efficientnet_lite2"])
    ap.add_argument("--torch", nargs="*", default=[])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    print("| engine | model | batch | ms/image |")
    print("|---|---|---|---|", flush=True)
    for model in args.model:
        embedder = load_embedder(model, batch_size=max(args.batch))
        size = embedder.input_size
        for batch in args.batch:
            x = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
            reps = args.repeats if batch == 1 else max(3, args.repeats // 3)
            ms = time_ms_per_image(lambda x=x, e=embedder: e.embed_arrays(x), batch, reps)
            print(
                f"| onnxruntime ({embedder.card.kind}) | {embedder.card.name} | {batch} |"
                f" {ms:.1f} |",
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

                ms = time_ms_per_image(run, batch, reps)
                print(f"| torch eager fp32 | {backbone} | {batch} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
