"""A data-free step whose student updates take their batches from `student_batches` (one
generator forward, one replay draw and one teacher forward for all of the step's updates) against
the same step making each update's batch on its own, as the steps did before. The two take turns
in blocks within one process (see step_interleaved.py for why), on the `mnist` preset with replay
from the first step and randomly initialised networks. Run:

    python benchmarks/step_student_batches.py --methods pre-dfkd adversarial memory-bank \
        --json benchmarks/results/step-student-batches-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dfkd_fast.distill import preset_config
from dfkd_fast.distill.steps import STEP_FUNCTIONS, generator_step, update_student
from dfkd_fast.host_memory import retain_freed_host_memory
from dfkd_fast.ops.kd_div import kd_div
from dfkd_fast.ops.reparameterize import sample_prior
from dfkd_fast.training import random_translate
from harness import device_name, interleaved_step_medians, random_networks_run


def per_update_student_step(run, replay_count: int) -> torch.Tensor:
    """One student update whose batch is made for it alone: the previous student step."""
    config = run.config
    fresh_count = config.batch_size - replay_count
    with torch.no_grad(), run.autocast():
        latent = sample_prior(fresh_count, config.latent_dim, generator=run.rng, device=run.device)
        images = run.generator(latent)
        if replay_count:
            replayed = run.replay.sample(replay_count, run.replay_rng)
            images = torch.cat([images, replayed.to(images.dtype)])
        images = random_translate(images, config.max_shift, run.rng)
        teacher_logits = run.teacher(images)
    with run.autocast():
        loss = kd_div(run.student(images), teacher_logits, config.temperature)
    update_student(run, loss)
    return loss.detach()


def per_update_step(run, step: int) -> dict:
    """A data-free step (any of the three methods) with per-update student batches."""
    images, teacher_logits, losses = generator_step(run)
    replay_count = 0
    if run.replay is not None:
        run.replay.update(images.float(), teacher_logits, run.teacher, run.replay_rng)
        replay_count = run.config.replay_batch_size if step >= run.config.first_replay_step else 0
    for _ in range(run.config.student_steps):
        losses["student"] = per_update_student_step(run, replay_count)
    run.student_schedule.step()
    return losses


def measure(method: str, blocks: int, steps_per_block: int) -> dict:
    config = preset_config("mnist", method=method, replay_start=0.0)
    steppers = {}
    for name, step_function in (("one batch per update", per_update_step),
                                ("student_batches", STEP_FUNCTIONS[method])):  # fmt: skip
        run = random_networks_run(config)
        for _ in range(3):
            step_function(run, config.steps)
        steppers[name] = lambda run=run, step_function=step_function: step_function(run, config.steps)
    medians = interleaved_step_medians(steppers, blocks, steps_per_block)
    return {"method": method, "median_ms": medians,
            "speedup": medians["one batch per update"] / medians["student_batches"],
            "steps_timed_each": blocks * steps_per_block}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["pre-dfkd"],
                        choices=["pre-dfkd", "adversarial", "memory-bank"])  # fmt: skip
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps-per-block", type=int, default=3)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    retain_freed_host_memory()  # as the CLI does
    results = []
    for method in arguments.methods:
        results.append(measure(method, arguments.blocks, arguments.steps_per_block))
        medians = results[-1]["median_ms"]
        print(f"{method}: one batch per update {medians['one batch per update']:.1f} ms, "
              f"student_batches {medians['student_batches']:.1f} ms, "
              f"speed-up {results[-1]['speedup']:.3f}x")  # fmt: skip
    if arguments.json:
        report = {"device": device_name("cpu"), "torch": torch.__version__,
                  "workload": "mnist preset, lenet5 -> lenet5_half, batch 256, 5 student updates",
                  "results": results}  # fmt: skip
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
