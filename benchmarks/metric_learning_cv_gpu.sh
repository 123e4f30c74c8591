#!/usr/bin/env bash
# Issue #3 on one GPU, cross-validated: recipe E (whole Lite2 backbone, backbone lr x0.1, each
# product's catalog image repeated 21x, 20 epochs) trained once per fold of a seeded K-fold
# split of grocery-dev's PRODUCTS, the K trainings side by side. Every product is held out by
# exactly one fold, so scoring each fold's model on its own held-out products (on the CPU,
# benchmarks/grocery_cv.py) measures all 41 products as unseen, not 16.
#
# Here:    python scripts/pack_manifest.py ../shared/datasets/grocery-dev/manifest.csv \
#            .carry/grocery --long-side 280 --quality 65          # all images, 35.6 MiB
# There:   bash benchmarks/metric_learning_cv_gpu.sh .carry/grocery OUT_DIR   (from the repo
#          root, efficientnet-lite2 importable, PYTHONPATH=src)
# Back:    OUT_DIR/foldN.tar.part-aa, -ab (ONNX + card + history; under 16 MiB each) and cv.log.
#          cat foldN.tar.part-* | tar xf - -C runs/grocery-cv/foldN
set -euo pipefail
DATA=${1:?usage: bash benchmarks/metric_learning_cv_gpu.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: bash benchmarks/metric_learning_cv_gpu.sh DATA_DIR OUT_DIR}
FOLDS=${FOLDS:-3}
RUNS=${RUNS:-/tmp/snapshop-cv-runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-$(( ($(nproc) - 2) / FOLDS ))}
snapshop() { python -c 'from snapshop.cli import app; app()' "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

fold_run() {
  local f=$1 t0=$SECONDS
  # The same seed and options as runs/grocery-cv/foldN.csv here: the same products per fold.
  snapshop prepare "$DATA/manifest.csv" --out "$DATA/fold$f.csv" --max-images 0 --keep-roles \
    --seed 0 --folds "$FOLDS" --fold "$f"
  snapshop -v train --manifest "$DATA/fold$f.csv" --train-where split=train --eval-where split=none \
    --device "${DEVICE:-cuda}" --train-blocks -1 --workers "$WORKERS" --epochs "${EPOCHS:-20}" \
    --lr-step 8 --dim 512 --repeat-where domain=iconic --repeat 21 --out "$RUNS/fold$f"
  echo "fold $f: $((SECONDS - t0)) s"
  tar cf - -C "$RUNS/fold$f" model.onnx model.json history.json | split -b 15M - "$OUT/fold$f.tar.part-"
}
t0=$SECONDS
pids=()
for ((f = 0; f < FOLDS; f++)); do
  fold_run "$f" > >(sed -u "s/^/[fold$f] /" >> "$OUT/cv.log") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "all folds done in $((SECONDS - t0)) s (status $status)" | tee -a "$OUT/cv.log"
grep -h "fold .*: [0-9]* s\|trained on\|Error\|error" "$OUT/cv.log" || true
ls -la "$OUT"
exit "$status"
