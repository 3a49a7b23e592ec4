#!/usr/bin/env bash
# MNIST LeNet-5 teacher -> LeNet-5-half from an unlabeled collection WITHOUT MNIST
# (Fashion-MNIST + KMNIST + CIFAR-10 in grayscale, resized + noise), uniform vs related sampling;
# then the same collection with 1% of MNIST's training images hidden in it.
# Writes runs/mnist-unlabeled-*/ and benchmarks/results/distill-unlabeled-mnist-cpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${DFKD_FAST_SHARED:-../shared}"
data="$shared/data"
teacher=teachers/mnist-lenet5.pt
[ -f "$teacher" ] || dfkd-fast train-teacher --dataset mnist --data-dir "$data/mnist" --arch lenet5 --output "$teacher"
collection=(--collection "fashion-mnist:$data/fashion-mnist" --collection "kmnist:$data/kmnist"
            --collection "cifar10-jpeg:$data/cifar10-jpeg75" --collection noise:20000)
hidden=(--collection "mnist:$data/mnist@0.01")
run() {  # name, then extra arguments
    local name=$1; shift
    dfkd-fast distill --teacher "$teacher" --test-data "$data/mnist" --method unlabeled \
        --output-dir "runs/mnist-unlabeled-$name" --resume "$@"
}
run uniform "${collection[@]}" --policy uniform "$@"
run related "${collection[@]}" --policy proportional "$@"
# evaluated every 25 steps: the first step at 95% is what the two policies are compared on
run hidden-uniform "${collection[@]}" "${hidden[@]}" --policy uniform --eval-every 25 "$@"
run hidden-related "${collection[@]}" "${hidden[@]}" --policy proportional --eval-every 25 "$@"
dfkd-fast compare runs/mnist-unlabeled-{uniform,related,hidden-uniform,hidden-related} \
    --json benchmarks/results/distill-unlabeled-mnist-cpu.json --plot docs/img/mnist-unlabeled-accuracy.png \
    --title "MNIST teacher, unlabeled collection: uniform vs related sampling"
