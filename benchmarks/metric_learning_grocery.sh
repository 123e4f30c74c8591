#!/usr/bin/env bash
# Issue #3: NormSoftmax on grocery-dev train products, evaluated on held-out products only.
# Prints the split table, the per-epoch training log and both protocols' tables
# (off-the-shelf Lite2 vs the trained model); writes plots under docs/.
# Usage: bash benchmarks/metric_learning_grocery.sh [RUN_DIR]   (from the repository root)
set -euo pipefail
RUN=${1:-runs/grocery}
DATA=../shared/datasets/grocery-dev/manifest.csv
snapshop prepare "$DATA" --out "$RUN/split.csv" --test-fraction 0.4 --max-images 0 \
  --keep-roles --seed 0
snapshop -v train --manifest "$RUN/split.csv" --out "$RUN/lite2-head" \
  --eval-gallery-where domain=iconic --epochs 8 --views 3
for protocol in all catalog; do
  where=(--query-where split=test --gallery-where split=test)
  [[ $protocol == catalog ]] && where+=(--gallery-where domain=iconic)
  snapshop evaluate --manifest "$RUN/split.csv" -m efficientnet_lite2 -m "$RUN/lite2-head" \
    -k 1 -k 2 -k 4 -k 5 -k 8 -k 10 -k 100 "${where[@]}" \
    --plot "docs/img/grocery-heldout-$protocol-recall.png" \
    --grid "$RUN/heldout-$protocol-grid.png" --json-out "$RUN/eval-$protocol.json"
done
# Model B: the last MBConv block + head conv train too (cached block-19 outputs).
snapshop -v train --manifest "$RUN/split.csv" --out "$RUN/lite2-last1" \
  --eval-gallery-where domain=iconic --epochs 6 --lr-step 3 --views 3 --train-blocks 1
for protocol in all catalog; do
  where=(--query-where split=test --gallery-where split=test)
  [[ $protocol == catalog ]] && where+=(--gallery-where domain=iconic)
  snapshop evaluate --manifest "$RUN/split.csv" -m "$RUN/lite2-last1" \
    -k 1 -k 2 -k 4 -k 5 -k 8 -k 10 -k 100 "${where[@]}" --json-out "$RUN/eval-$protocol-last1.json"
done
# Model C: the last 4 blocks train too; model D: C + each product's catalog image repeated 21x
# among the training rows, so class-balanced batches usually hold it.
snapshop -v train --manifest "$RUN/split.csv" --out "$RUN/lite2-last4" \
  --eval-gallery-where domain=iconic --epochs 9 --lr-step 5 --views 4 --train-blocks 4
snapshop -v train --manifest "$RUN/split.csv" --out "$RUN/lite2-last4-iconic20" \
  --eval-gallery-where domain=iconic --epochs 9 --lr-step 5 --views 4 --train-blocks 4 \
  --repeat-where domain=iconic --repeat 21
for m in lite2-last4 lite2-last4-iconic20; do
  for protocol in all catalog; do
    where=(--query-where split=test --gallery-where split=test)
    [[ $protocol == catalog ]] && where+=(--gallery-where domain=iconic)
    snapshop evaluate --manifest "$RUN/split.csv" -m "$RUN/$m" \
      -k 1 -k 2 -k 4 -k 5 -k 8 -k 10 -k 100 "${where[@]}" --json-out "$RUN/eval-$protocol-${m#lite2-}.json"
  done
done
