#!/usr/bin/env bash
# MNIST, LeNet-5 teacher -> LeNet-5-half student, data-free: the three methods side by side.
# Writes runs/mnist-<method>/ and benchmarks/results/distill-mnist-cpu.json, docs/img/mnist-accuracy.png.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${DFKD_FAST_SHARED:-../shared}/data/mnist"
teacher=teachers/mnist-lenet5.pt
[ -f "$teacher" ] || dfkd-fast train-teacher --dataset mnist --data-dir "$data" --arch lenet5 --output "$teacher"
for method in ${METHODS:-adversarial pre-dfkd memory-bank}; do
    dfkd-fast distill --teacher "$teacher" --test-data "$data" --method "$method" \
        --output-dir "runs/mnist-$method" --resume "$@"
done
dfkd-fast compare runs/mnist-adversarial runs/mnist-pre-dfkd runs/mnist-memory-bank \
    --json benchmarks/results/distill-mnist-cpu.json --plot docs/img/mnist-accuracy.png \
    --title "MNIST, LeNet-5 -> LeNet-5-half, data-free"
