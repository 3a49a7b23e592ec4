#!/usr/bin/env bash
# CIFAR-10, pretrained ResNet-56 teacher (shared weights) -> ResNet-20, data-free, pre-dfkd,
# evaluated on the exact 1000-image test subset. Extra arguments go to `dfkd-fast distill`:
#   CPU, a short run that shows learning (bfloat16 autocast and channels_last: 1.6x and 1.25x
#   faster steps here, docs/benchmarks.md):
#     bash benchmarks/distill_cifar10.sh --steps 60 --batch-size 64 --student-steps 2 --eval-every 10 \
#         --cpu-amp --channels-last
#   GPU, the full run:  bash benchmarks/distill_cifar10.sh --device cuda --steps 20000
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${DFKD_FAST_SHARED:-../shared}"
output="${OUTPUT_DIR:-runs/cifar10-pre-dfkd}"
dfkd-fast distill --teacher "$shared/models/cifar10-resnet/resnet56-4bfd9763.th" \
    --teacher-arch resnet56 --dataset cifar10 --student-arch resnet20 \
    --test-data "$shared/data/cifar10-exact-subset" --method pre-dfkd \
    --output-dir "$output" --resume "$@"
dfkd-fast compare "$output" --json "benchmarks/results/distill-cifar10-${RESULT_TAG:-cpu}.json" \
    --plot "docs/img/cifar10-accuracy-${RESULT_TAG:-cpu}.png" --title "CIFAR-10, ResNet-56 -> ResNet-20, data-free (pre-dfkd)"
