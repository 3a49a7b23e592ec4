"""One pre-dfkd step with dfkd_fast's ops against the same step on the reference ops, the two
taking turns in blocks within one process, so that a machine that speeds up or slows down during
the run affects both alike (bench_distill_step.py runs each case's rounds together, and its
ratios moved with the order of the cases). Same workload as bench_distill_step.py's MNIST case:
the `mnist` preset, 2 student updates, replay from the first step, randomly initialised
networks. Run:

    python benchmarks/step_interleaved.py --precision float32 bfloat16 \
        --json benchmarks/results/distill_step-interleaved-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dfkd_fast
from dfkd_fast.distill import preset_config
from harness import device_name, interleaved_step_medians, random_networks_run

IMPLEMENTATIONS = {"dfkd_fast": "auto", "reference": "reference"}


def measure(precision: str, blocks: int, steps_per_block: int) -> dict:
    mixed = precision == "bfloat16"
    config = preset_config("mnist", method="pre-dfkd", student_steps=2, replay_start=0.0,
                           amp=mixed, cpu_amp=mixed)  # fmt: skip
    run = random_networks_run(config)
    for _ in range(3):
        run.step_function(run, config.steps)

    def stepper(backend: str):
        def step():
            with dfkd_fast.use_backend(backend):
                run.step_function(run, config.steps)

        return step

    steppers = {name: stepper(backend) for name, backend in IMPLEMENTATIONS.items()}
    medians = interleaved_step_medians(steppers, blocks, steps_per_block)
    return {"precision": precision, "median_ms": medians,
            "speedup": medians["reference"] / medians["dfkd_fast"],
            "steps_timed": {name: blocks * steps_per_block for name in IMPLEMENTATIONS}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])  # fmt: skip
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps-per-block", type=int, default=3)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    results = []
    for precision in arguments.precision:
        results.append(measure(precision, arguments.blocks, arguments.steps_per_block))
        medians = results[-1]["median_ms"]
        print(f"{precision}: dfkd_fast {medians['dfkd_fast']:.1f} ms, reference "
              f"{medians['reference']:.1f} ms, speed-up {results[-1]['speedup']:.3f}x")  # fmt: skip
    if arguments.json:
        report = {"device": device_name("cpu"), "torch": torch.__version__,
                  "workload": "mnist-lenet5, batch 256", "results": results}  # fmt: skip
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
