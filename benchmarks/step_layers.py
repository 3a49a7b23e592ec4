"""One step of a preset's workload with the networks' few-channel layers (the generator's last
convolution, LeNet-5's first) as FewChannelConv2d (dfkd_fast.few_channel_conv2d) against the same
step with each of them as the nn.Conv2d it derives from, on the same parameters: the two take turns
in blocks within one process, on one run (randomly initialised networks, replay from the first
step), so that the machine's drift affects both alike. Run:

    python benchmarks/step_few_channel_conv.py --preset mnist --set cpu_amp=false \
        --json benchmarks/results/step-few-channel-conv-mnist-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from dfkd_fast.host_memory import retain_freed_host_memory
from dfkd_fast.nn import FewChannelConv2d
from harness import device_name, interleaved_step_medians, preset_run
from step_configs import config_problem, parse_override

LAYERS = ("FewChannelConv2d", "nn.Conv2d")


def few_channel_layers(run) -> list[nn.Module]:
    networks = [run.generator, run.teacher, run.student]
    if getattr(run, "replay", None) is not None and hasattr(run.replay, "vae"):
        networks.append(run.replay.vae)
    return [m for net in networks for m in net.modules() if isinstance(m, FewChannelConv2d)]


def measure(preset: str, overrides: dict, device: str, blocks: int, steps_per_block: int) -> dict:
    run = preset_run(preset, device=device, **{"method": "pre-dfkd", **overrides})
    layers = few_channel_layers(run)
    # FewChannelConv2d adds no state to nn.Conv2d, so a layer's class is all that tells the two
    # apart: switching it keeps the parameters (and the optimisers' hold on them).
    classes = {LAYERS[0]: FewChannelConv2d, LAYERS[1]: nn.Conv2d}

    def stepper(name: str):
        def step():
            for layer in layers:
                layer.__class__ = classes[name]
            run.step_function(run, run.config.steps)
            if device == "cuda":
                torch.cuda.synchronize()

        return step

    steppers = {name: stepper(name) for name in LAYERS}
    for step in steppers.values():
        step()
    medians = interleaved_step_medians(steppers, blocks, steps_per_block)
    return {"preset": preset, "overrides": overrides, "layers": [repr(l) for l in layers],
            "median_ms": medians, "speedup": medians[LAYERS[1]] / medians[LAYERS[0]],
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
          + f", speed-up {result['speedup']:.3f}x ({len(result['layers'])} layers)")  # fmt: skip
    if arguments.json:
        report = {"device": device_name(arguments.device), "torch": torch.__version__, **result}
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
