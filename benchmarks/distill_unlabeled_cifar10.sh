#!/usr/bin/env bash
# CIFAR-10, pretrained ResNet-56 teacher (shared weights) -> ResNet-20 from an unlabeled collection:
# MNIST, Fashion-MNIST, KMNIST (upscaled to 32x32, grey to colour), noise and 5% of the CIFAR-10
# JPEG training images; uniform vs related (energy+BN-typicality) sampling, evaluated on the exact
# 1000-image test subset. Extra arguments go to `dfkd-fast distill`:
#   CPU, a short run:  bash benchmarks/distill_unlabeled_cifar10.sh --steps 400 --batch-size 64
#   GPU, the full run: RESULT_TAG=h100 bash benchmarks/distill_unlabeled_cifar10.sh --device cuda
# SOURCE_FRACTION (default 1) keeps that fraction of each of MNIST, Fashion-MNIST and KMNIST;
# CIFAR_SOURCE replaces the CIFAR-10 spec (an .npz of those 5% travels where the archive cannot);
# POLICIES (default "uniform related") chooses the runs.
# Writes runs/cifar10-unlabeled-{uniform,related}-<tag>/ and benchmarks/results/distill-unlabeled-cifar10-<tag>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${DFKD_FAST_SHARED:-../shared}"
data="$shared/data"
suffix=""
[ "${SOURCE_FRACTION:-1}" = 1 ] || suffix="@$SOURCE_FRACTION"
tag="${RESULT_TAG:-cpu}"
collection=(--collection "mnist:$data/mnist$suffix" --collection "fashion-mnist:$data/fashion-mnist$suffix"
            --collection "kmnist:$data/kmnist$suffix" --collection noise:20000
            --collection "${CIFAR_SOURCE:-cifar10-jpeg:$data/cifar10-jpeg75@0.05}")
runs=()
for policy in ${POLICIES:-uniform related}; do
    output="runs/cifar10-unlabeled-$policy-$tag"
    runs+=("$output")
    [ "$policy" = related ] && sampling=proportional || sampling=uniform
    dfkd-fast distill --teacher "$shared/models/cifar10-resnet/resnet56-4bfd9763.th" \
        --teacher-arch resnet56 --dataset cifar10 --student-arch resnet20 \
        --test-data "$data/cifar10-exact-subset" --method unlabeled "${collection[@]}" \
        --policy "$sampling" --output-dir "$output" --resume "$@"
done
dfkd-fast compare "${runs[@]}" \
    --json "benchmarks/results/distill-unlabeled-cifar10-$tag.json" \
    --plot "docs/img/cifar10-unlabeled-accuracy-$tag.png" \
    --title "CIFAR-10 teacher, unlabeled collection: uniform vs related sampling"
