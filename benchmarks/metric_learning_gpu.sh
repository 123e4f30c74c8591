#!/usr/bin/env bash
# Issue #3 on one GPU: NormSoftmax fine-tuning of the WHOLE Lite2 backbone (images augmented at
# every step) on grocery-dev's train products; the held-out products are scored afterwards on
# the CPU with `snapshop evaluate` (docs/benchmarks.md).
#
# Here:    python scripts/pack_manifest.py runs/grocery/split.csv .carry/grocery \
#            --where split=train --long-side 300 --quality 80
# There:   bash benchmarks/metric_learning_gpu.sh .carry/grocery OUT_DIR   (from the repo root,
#          with the efficientnet-lite2 package importable and PYTHONPATH=src)
# Each model comes back as OUT_DIR/NAME.tar.part-aa, -ab ... (files under 16 MB); join with
#   cat NAME.tar.part-* | tar xf - -C runs/grocery/NAME
set -euo pipefail
DATA=$1
OUT=$2
RUNS=${RUNS:-/tmp/snapshop-gpu-runs}
export PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-$(($(nproc) - 2))}
snapshop() { python -c 'from snapshop.cli import app; app()' "$@"; }
common=(--manifest "$DATA/manifest.csv" --train-where split=train --device "${DEVICE:-cuda}"
        --train-blocks -1 --workers "$WORKERS" --epochs "${EPOCHS:-20}" --lr-step 8 --dim 512)
train_and_pack() {
  local name=$1; shift
  local t0=$SECONDS
  snapshop -v train "${common[@]}" --out "$RUNS/$name" "$@" 2>&1 | tee -a "$OUT/train.log"
  echo "$name: $((SECONDS - t0)) s"
  tar cf - -C "$RUNS/$name" model.onnx model.json history.json | split -b 15M - "$OUT/$name.tar.part-"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# E: whole backbone (backbone lr 0.001, head and proxies 0.01), each product's catalog image
# repeated 21x (as model D); F: the same without the repeat.
train_and_pack lite2-full-iconic20 --repeat-where domain=iconic --repeat 21
train_and_pack lite2-full
ls -la "$OUT"
