"""One step of a preset's workload with the generator's and the VAE decoder's upsample-conv
layers as UpsampleConv2d (dfkd_fast.upsample_conv2d) against the same step with each of them
as nn.Upsample followed by nn.Conv2d, sharing the same parameters: the two layouts take turns in
blocks within one process, on one run (randomly initialised networks, replay from the first
step), so that the machine's drift affects both alike. Run:

    python benchmarks/step_upsample_conv.py --preset mnist --set cpu_amp=false \
        --json benchmarks/results/step-upsample-conv-mnist-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dfkd_fast.host_memory import retain_freed_host_memory
from dfkd_fast.models.layers import separate_upsampling
from harness import device_name, interleaved_step_medians, preset_run
from step_configs import config_problem, parse_override

LAYOUTS = ("UpsampleConv2d", "nn.Upsample + nn.Conv2d")


def measure(preset: str, overrides: dict, device: str, blocks: int, steps_per_block: int) -> dict:
    run = preset_run(preset, device=device, **{"method": "pre-dfkd", **overrides})
    places = [(run.generator, "body")]
    if getattr(run, "replay", None) is not None and hasattr(run.replay, "vae"):
        places.append((run.replay.vae, "decoder"))
    layouts = {  # the second shares the first's parameters, so the optimisers update both
        LAYOUTS[0]: [getattr(module, name) for module, name in places],
        LAYOUTS[1]: [separate_upsampling(getattr(module, name)) for module, name in places],
    }

    def stepper(layout: str):
        def step():
            for (module, name), sequential in zip(places, layouts[layout]):
                setattr(module, name, sequential)
            run.step_function(run, run.config.steps)
            if device == "cuda":
                torch.cuda.synchronize()

        return step

    steppers = {layout: stepper(layout) for layout in LAYOUTS}
    for step in steppers.values():
        step()
    medians = interleaved_step_medians(steppers, blocks, steps_per_block)
    return {"preset": preset, "overrides": overrides, "median_ms": medians,
            "speedup": medians[LAYOUTS[1]] / medians[LAYOUTS[0]],
            "steps_timed": blocks * steps_per_block}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist", choices=["mnist", "cifar10"])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        type=parse_override, help="a DistillConfig field's value")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps-per-block", type=int, default=3)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    overrides = dict(arguments.set)
    problem = config_problem(arguments.preset, overrides)
    if problem:
        parser.error(problem)
    retain_freed_host_memory()
    result = measure(arguments.preset, overrides, arguments.device, arguments.blocks,
                     arguments.steps_per_block)  # fmt: skip
    medians = result["median_ms"]
    print(f"{arguments.preset} on {device_name(arguments.device)}: "
          + ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items())
          + f", speed-up {result['speedup']:.3f}x")  # fmt: skip
    if arguments.json:
        report = {"device": device_name(arguments.device), "torch": torch.__version__, **result}
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
