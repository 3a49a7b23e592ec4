"""How much a finished pre-dfkd run's replay looks like its generator's images, to the teacher:
the teacher's mean top probability, its predicted-class counts, the image standard deviation and
the student's agreement with the teacher, for the generator's images and for the VAE's decodings
of the fitted Gaussian and of N(0, I); and how far the VAE's posteriors sit from N(0, I).

    python3 benchmarks/replay_quality.py runs/mnist-pre-dfkd --teacher teachers/mnist-lenet5.pt \
        --json benchmarks/results/replay-quality-mnist-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dfkd_fast.distill import DistillConfig
from dfkd_fast.distill.engine import CHECKPOINT_NAME, STUDENT_NAME, Run
from dfkd_fast.io import atomic_write_json, load_checkpoint
from dfkd_fast.models import build_classifier
from dfkd_fast.ops.reparameterize import sample_prior
from dfkd_fast.training import load_classifier


def describe(images: torch.Tensor, teacher, student) -> dict:
    with torch.no_grad():
        teacher_probabilities = teacher(images).softmax(dim=1)
        student_predictions = student(images).argmax(dim=1)
    predictions = teacher_probabilities.argmax(dim=1)
    return {
        "teacher_top_probability": teacher_probabilities.max(dim=1).values.mean().item(),
        "teacher_class_counts": torch.bincount(
            predictions, minlength=teacher_probabilities.shape[1]).tolist(),
        "student_agreement": (student_predictions == predictions).float().mean().item(),
        "image_std": images.std().item(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished pre-dfkd run's folder")
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args(argv)
    checkpoint = load_checkpoint(arguments.run / CHECKPOINT_NAME)
    config = DistillConfig.from_dict(checkpoint["config"])
    if config.method != "pre-dfkd":
        parser.error(f"{arguments.run} is a {config.method} run, not a pre-dfkd one")
    teacher, info = load_classifier(arguments.teacher)
    student_record = load_checkpoint(arguments.run / STUDENT_NAME)["classifier"]
    student = build_classifier(student_record["arch"], info.num_classes, info.image_shape[0])
    run = Run(teacher, student, config, info.image_shape, bn_layers=False)
    run.load_state_dict(checkpoint["run"])
    kept_student = run.kept_student().eval()
    rng = torch.Generator(run.device).manual_seed(arguments.seed)
    vae = run.replay.vae.eval()
    with torch.no_grad():
        latent = sample_prior(arguments.count, config.latent_dim, generator=rng, device=run.device)
        samples = {
            "generator": run.generator(latent),
            "vae, fitted Gaussian": vae.sample(arguments.count, rng, fitted=True),
            "vae, N(0, I)": vae.sample(arguments.count, rng, fitted=False),
        }
        mu, logvar = vae.encode(samples["generator"])
    report = {"run": str(arguments.run), "step": checkpoint["step"], "count": arguments.count,
              "samples": {name: describe(images.float(), run.teacher, kept_student)
                          for name, images in samples.items()},
              # how far the posteriors of the generator's images sit from N(0, I)
              "posterior_mean_spread": mu.float().std(dim=0).mean().item(),
              "posterior_std": (0.5 * logvar.float()).exp().mean().item()}  # fmt: skip
    for name, numbers in report["samples"].items():
        print(f"{name:22s} teacher top probability {numbers['teacher_top_probability']:.3f}, "
              f"student agrees {numbers['student_agreement']:.1%}, image std "
              f"{numbers['image_std']:.2f}, teacher classes {numbers['teacher_class_counts']}")
    print(f"posteriors of the generator's images: means spread {report['posterior_mean_spread']:.2f}"
          f" per dimension, standard deviation {report['posterior_std']:.2f}")
    if arguments.json:
        atomic_write_json(arguments.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
