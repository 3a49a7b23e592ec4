"""Whether replay keeps what a drifting generator stops making. The data-free methods run with the
generator's class-balance term replaced by one that pulls its samples onto a subset of the
classes: the first half of the classes for the first part of the run, the next half after it.
The student then sees the first classes only in the first part, so it forgets them unless it
rehearses them. For each run: the accuracy on the first part's classes and on the others, at the
last evaluation before the switch and at the end, and the teacher's classes of the synthetic
samples on each side of the switch; the plot shows each method's accuracy on the first classes,
its mean over the seeds drawn and their range shaded.

    python3 benchmarks/replay_under_drift.py --teacher teachers/mnist-lenet5.pt \
        --test-data ../shared/data/mnist --steps 1600 --eval-every 50 --seeds 0 1 \
        --json benchmarks/results/replay-under-drift-mnist-cpu.json \
        --plot docs/img/mnist-replay-under-drift.png

Arguments it does not know go to `dfkd-fast distill` (without --teacher: the digits default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from unittest import mock

import torch

from dfkd_fast import cli
from dfkd_fast.distill import steps
from dfkd_fast.distill.report import plot_curve_bands
from dfkd_fast.io import atomic_write_json

METHODS = ("adversarial", "pre-dfkd", "memory-bank")


def phase_classes(phase: int, phases: int, num_classes: int) -> list[int]:
    """The classes the generator is pulled onto in `phase` of `phases`: consecutive, equal
    blocks (the last takes the remainder)."""
    size = num_classes // phases
    end = num_classes if phase == phases - 1 else (phase + 1) * size
    return list(range(phase * size, end))


def phase_of(step: int, total_steps: int, phases: int) -> int:
    return min(phases - 1, (step - 1) * phases // total_steps)


def pull_onto(teacher_logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Cross-entropy of the batch's mean teacher prediction against the uniform distribution
    over `classes`: low when the batch's samples spread evenly over those classes only."""
    mean_prediction = teacher_logits.float().softmax(dim=1).mean(dim=0)
    return -mean_prediction[classes].clamp_min(1e-12).log().mean()


class Drift:
    """Patches the step functions and the generator loss for as long as it is entered: each step
    sets the phase, and the generator's balance term pulls onto that phase's classes."""

    def __init__(self, total_steps: int, phases: int):
        self.total_steps, self.phases = total_steps, phases
        self.phase = 0
        self.config, self.without_balance = None, None

    def generator_loss(self, teacher_logits, student_logits, bn_loss, features, config):
        if config is not self.config:
            self.config = config
            self.without_balance = dataclasses.replace(config, balance_weight=0.0)
        loss, disagreement = self.original_loss(teacher_logits, student_logits, bn_loss, features,
                                                self.without_balance)  # fmt: skip
        classes = phase_classes(self.phase, self.phases, teacher_logits.shape[1])
        return loss + config.balance_weight * pull_onto(teacher_logits, classes), disagreement

    def stepping(self, step_function):
        def step_in_phase(run, step):
            self.phase = phase_of(step, self.total_steps, self.phases)
            return step_function(run, step)

        return step_in_phase

    def __enter__(self):
        self.original_loss = steps.generator_loss
        self.patches = [mock.patch.object(steps, "generator_loss", self.generator_loss),
                        mock.patch.dict(steps.STEP_FUNCTIONS, {
                            method: self.stepping(steps.STEP_FUNCTIONS[method])
                            for method in METHODS})]  # fmt: skip
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in reversed(self.patches):
            patch.stop()


def mean_over(values: list[float | None], classes: list[int]) -> float:
    return statistics.fmean(values[k] for k in classes if values[k] is not None)


def accuracy_on(curve: list[dict], classes: list[int]) -> list[dict]:
    """The curve of the mean accuracy over `classes`, as entries `plot_curve_bands` draws."""
    return [{"step": entry["step"], "accuracy": mean_over(entry["class_accuracy"], classes)}
            for entry in curve if "class_accuracy" in entry]  # fmt: skip


def summary(curve: list[dict], total_steps: int, phases: int) -> dict:
    """Accuracy on the first phase's classes and on the rest, before the switch and at the end;
    the synthetic samples' share of the first phase's classes in the intervals around it."""
    evaluated = [entry for entry in curve if "class_accuracy" in entry]
    num_classes = len(evaluated[-1]["class_accuracy"])
    first = phase_classes(0, phases, num_classes)
    later = [k for k in range(num_classes) if k not in first]
    switch = next(step for step in range(1, total_steps + 1)
                  if phase_of(step, total_steps, phases) > 0)  # fmt: skip
    before = [entry for entry in evaluated if entry["step"] < switch][-1]
    end = evaluated[-1]
    after = [entry["accuracy"] for entry in accuracy_on(evaluated, first)
             if entry["step"] >= switch]  # fmt: skip

    def synthetic_share(entry):
        return round(sum(entry["synthetic_class_shares"][k] for k in first), 4)

    return {
        "switch_step": switch, "first_classes": first, "before_step": before["step"],
        "first_classes_before": round(mean_over(before["class_accuracy"], first), 5),
        "later_classes_before": round(mean_over(before["class_accuracy"], later), 5),
        "first_classes_final": round(mean_over(end["class_accuracy"], first), 5),
        "later_classes_final": round(mean_over(end["class_accuracy"], later), 5),
        "first_classes_lowest_after_switch": round(min(after), 5),
        "final_accuracy": end["accuracy"],
        "synthetic_share_of_first_classes_before": synthetic_share(before),
        "synthetic_share_of_first_classes_final": synthetic_share(end),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="teacher checkpoint (default: the digits default)")
    parser.add_argument("--test-data", help="the teacher's test data folder")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output-root", type=Path, default=Path("runs/drift"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    arguments, distill_arguments = parser.parse_known_args(argv)
    if arguments.phases < 2:
        parser.error(f"--phases must be at least 2, got {arguments.phases}")
    given = [*(["--teacher", arguments.teacher] if arguments.teacher else []),
             *(["--test-data", arguments.test_data] if arguments.test_data else [])]  # fmt: skip
    runs, first_class_curves = [], {}
    for method in arguments.methods:
        for seed in arguments.seeds:
            output = arguments.output_root / f"{method}-seed{seed}"
            with Drift(arguments.steps, arguments.phases):
                code = cli.main(["distill", *given, "--method", method, "--seed", str(seed),
                                 "--steps", str(arguments.steps), "--output-dir", str(output),
                                 "--resume", *distill_arguments])  # fmt: skip
            if code != 0:
                return code
            metrics = json.loads((output / "metrics.json").read_text())
            numbers = summary(metrics["curve"], arguments.steps, arguments.phases)
            runs.append({"method": method, "seed": seed, "output_dir": str(output),
                         "seconds": round(metrics["seconds"], 1), **numbers})  # fmt: skip
            first = numbers["first_classes"]
            first_class_curves.setdefault(method, []).append(accuracy_on(metrics["curve"], first))
            print(f"{method}, seed {seed}: classes {first} {numbers['first_classes_before']:.2%} "
                  f"at step {numbers['before_step']}, {numbers['first_classes_final']:.2%} at "
                  f"the end; the others {numbers['later_classes_before']:.2%} -> "
                  f"{numbers['later_classes_final']:.2%}")  # fmt: skip
    if arguments.json:
        atomic_write_json(arguments.json, {"steps": arguments.steps, "phases": arguments.phases,
                                           "distill_arguments": distill_arguments, "runs": runs})
    if arguments.plot:
        plot_curve_bands(arguments.plot, first_class_curves,
                         f"accuracy on classes {runs[0]['first_classes']}, made only before step "
                         f"{runs[0]['switch_step']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
