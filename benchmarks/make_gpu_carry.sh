#!/usr/bin/env bash
# Builds gpu_carry/shared (git-ignored, about 50 MB): the slice of ../shared that the GPU stages of
# benchmarks/gpu_session.sh read, since ../shared does not travel to a lent GPU machine. The 46 MB
# CIFAR-10 JPEG archive is replaced by the 5% of it the unlabeled collection keeps (same seeded
# choice, decoded to uint8). On the GPU machine:
#   DFKD_FAST_SHARED=gpu_carry/shared CIFAR_SOURCE=gpu_carry/shared/data/cifar10-jpeg75-train-5pct.npz \
#       bash benchmarks/gpu_session.sh cifar10 unlabeled
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${DFKD_FAST_SHARED:-../shared}"
carry=gpu_carry/shared
grep -qx "/gpu_carry/" .git/info/exclude 2>/dev/null || echo "/gpu_carry/" >>.git/info/exclude
mkdir -p "$carry/data/cifar10-exact-subset" "$carry/models/cifar10-resnet"
cp "$shared/data/cifar10-exact-subset/test_first1000.npz" "$carry/data/cifar10-exact-subset/"
cp "$shared/models/cifar10-resnet/resnet56-4bfd9763.th" "$carry/models/cifar10-resnet/"
for name in mnist fashion-mnist; do
    mkdir -p "$carry/data/$name"
    cp "$shared/data/$name"/train-*-ubyte.gz "$carry/data/$name/"
done
mkdir -p "$carry/data/kmnist"
cp "$shared/data/kmnist/train_first7000.npz" "$carry/data/kmnist/"
python3 - "$shared/data/cifar10-jpeg75" "$carry/data/cifar10-jpeg75-train-5pct.npz" <<'PY'
import sys
import numpy as np
from dfkd_fast.unlabeled.collection import source_from_spec
source = source_from_spec(f"cifar10-jpeg:{sys.argv[1]}@0.05", (3, 32, 32))
np.savez_compressed(sys.argv[2], images=source.images.numpy())
PY
du -sh gpu_carry
