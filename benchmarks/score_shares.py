"""How well a run's cached relatedness scores single out one source, and what share of the draws
each source would get under the proportional policy at several temperatures (class-balanced, as
the presets sample). Sources are given in collection order as NAME=COUNT:

    python3 benchmarks/score_shares.py runs/cifar10-unlabeled-related-nvidia-h100-80gb-hbm3/scores-*.pt \
        --sources mnist=60000 fashion-mnist=60000 kmnist=7000 noise=20000 cifar10=2500 --target cifar10
"""

from __future__ import annotations

import argparse

import torch

from dfkd_fast.unlabeled.sampling import RelatednessSampler


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a positive sample scores above a negative one (rank statistic)."""
    ranks = torch.cat([positive, negative]).argsort().argsort().double() + 1
    count = len(positive)
    return ((ranks[:count].sum() - count * (count + 1) / 2) / (count * len(negative))).item()


def draw_shares(scores, predictions, counts, temperature: float, uniform_share: float = 0.0):
    """The share of the draws each source (`counts` samples each, in order) gets under the
    class-balanced proportional policy, a `uniform_share` spread over the whole collection."""
    sampler = RelatednessSampler(scores, predictions, "proportional", temperature,
                                 uniform_share=uniform_share)  # fmt: skip
    return [share.sum().item() for share in sampler.probabilities.split(counts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scores", help="a run's scores-*.pt (scores and teacher_logits)")
    parser.add_argument("--sources", nargs="+", required=True, help="NAME=COUNT, in collection order")
    parser.add_argument("--target", required=True, help="the source that should be found")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[2.0, 1.0, 0.5, 0.25])
    arguments = parser.parse_args()
    cached = torch.load(arguments.scores, weights_only=True)
    scores, predictions = cached["scores"].float(), cached["teacher_logits"].argmax(dim=1)
    names = [spec.split("=")[0] for spec in arguments.sources]
    counts = [int(spec.split("=")[1]) for spec in arguments.sources]
    if sum(counts) != len(scores):
        raise SystemExit(f"the sources hold {sum(counts)} samples, the scores {len(scores)}")
    per_source = dict(zip(names, scores.split(counts)))
    target = per_source[arguments.target]
    for name, values in per_source.items():
        if name != arguments.target:
            print(f"AUROC {arguments.target} vs {name}: {auroc(target, values):.2f}")
    for temperature in arguments.temperatures:
        shares = draw_shares(scores, predictions, counts, temperature)
        print(f"T = {temperature}: " + ", ".join(
            f"{name} {share:.1%}" for name, share in zip(names, shares)))


if __name__ == "__main__":
    main()
