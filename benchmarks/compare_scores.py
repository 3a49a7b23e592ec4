"""How well each relatedness score singles out the CIFAR-10 images hidden in the collection of
benchmarks/distill_unlabeled_cifar10.sh (MNIST, Fashion-MNIST, KMNIST, noise and 5% of the
CIFAR-10 JPEG training images), under the shared pretrained ResNet-56: the AUROC of the CIFAR-10
scores against each other source's, and the share of the draws each source gets under the
class-balanced proportional policy at several temperatures.

One teacher pass (`bn-typicality`, cached like a run's scores) gives the BN typicality and the
logits; msp, entropy, energy and energy+bn-typicality follow from those logits with dfkd_fast's
own functions. odin (`--odin`) needs a pass of its own with a backward.

    python3 benchmarks/compare_scores.py --json benchmarks/results/scores-cifar10-cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from score_shares import auroc, draw_shares

from dfkd_fast.io import atomic_write_json
from dfkd_fast.models.cifar import PRETRAINED_MEAN, PRETRAINED_STD
from dfkd_fast.training import ClassifierInfo, load_classifier
from dfkd_fast.unlabeled import Collection, score_collection
from dfkd_fast.unlabeled.scores import energy, energy_plus_bn_typicality, msp, negative_entropy

TARGET = "cifar10-jpeg"


def collection_specs(data: Path, source_fraction: float) -> list[str]:
    suffix = "" if source_fraction == 1 else f"@{source_fraction}"
    return [f"mnist:{data}/mnist{suffix}", f"fashion-mnist:{data}/fashion-mnist{suffix}",
            f"kmnist:{data}/kmnist{suffix}", "noise:20000",
            f"{TARGET}:{data}/cifar10-jpeg75@0.05"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-fraction", type=float, default=1.0,
                        help="keep this fraction of MNIST, Fashion-MNIST and KMNIST")
    parser.add_argument("--odin", action="store_true", help="also score with odin (slower)")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[2.0, 1.0, 0.5])
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/scores-cifar10"))
    parser.add_argument("--json", type=Path, help="write the numbers here")
    arguments = parser.parse_args()
    shared = Path(os.environ.get("DFKD_FAST_SHARED", "../shared"))
    teacher_path = shared / "models/cifar10-resnet/resnet56-4bfd9763.th"
    if not teacher_path.exists():
        print(f"{teacher_path} is missing: set DFKD_FAST_SHARED to the shared folder", file=sys.stderr)
        return 1
    info = ClassifierInfo("resnet56", 10, (3, 32, 32), PRETRAINED_MEAN, PRETRAINED_STD, "cifar10")
    teacher, info = load_classifier(teacher_path, info)
    collection = Collection.from_specs(collection_specs(shared / "data", arguments.source_fraction),
                                       info.image_shape, info.mean, info.std)  # fmt: skip
    names = [source.name.split("@")[0] for source in collection.sources]
    counts = [len(source) for source in collection.sources]
    typicality = score_collection(teacher, collection, "bn-typicality", cache_dir=arguments.cache_dir)
    logits = typicality.teacher_logits
    scores = {"msp": msp(logits), "entropy": negative_entropy(logits), "energy": energy(logits),
              "bn-typicality": typicality.scores,
              "energy+bn-typicality": energy_plus_bn_typicality(logits, typicality.scores)}
    if arguments.odin:
        scores["odin"] = score_collection(teacher, collection, "odin",
                                          cache_dir=arguments.cache_dir).scores  # fmt: skip
    predictions = logits.argmax(dim=1)
    results = {}
    print(f"| score | AUROC of {TARGET} vs " + " / ".join(n for n in names if n != TARGET) + " | "
          + " | ".join(f"{TARGET} share of draws at T = {t}" for t in arguments.temperatures) + " |")
    for score, values in scores.items():
        per_source = dict(zip(names, values.float().split(counts)))
        aurocs = {name: auroc(per_source[TARGET], per_source[name]) for name in names if name != TARGET}
        shares = {str(t): dict(zip(names, draw_shares(values.float(), predictions, counts, t)))
                  for t in arguments.temperatures}  # fmt: skip
        results[score] = {"auroc": aurocs, "draw_shares": shares}
        print(f"| {score} | " + " / ".join(f"{a:.2f}" for a in aurocs.values()) + " | "
              + " | ".join(f"{shares[str(t)][TARGET]:.1%}" for t in arguments.temperatures) + " |")
    if arguments.json is not None:
        atomic_write_json(arguments.json, {
            "command": " ".join(["python3", *sys.argv]), "teacher": str(teacher_path.name),
            "sources": dict(zip(names, counts)), "target": TARGET, "scores": results,
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
