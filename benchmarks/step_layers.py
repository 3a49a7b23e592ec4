"""One step of a preset's workload with some of the networks' layers as dfkd_fast computes them
against the same step with those layers as plain PyTorch computes them, on the same parameters:
the two take turns in blocks within one process, on one run (randomly initialised networks,
replay from the first step), so that the machine's drift affects both alike. --layer picks:

    few_channel_conv  FewChannelConv2d (the generator's last convolution, LeNet-5's first)
                      against the nn.Conv2d it derives from
    max_pool          MaxPool2x2 with gradients (LeNet-5's pooling in the student and in the
                      generator update) by the max_pool2x2 kernel against max_pool2d

Run:

    python benchmarks/step_layers.py --layer few_channel_conv --preset mnist --set cpu_amp=false \
        --json benchmarks/results/step-few-channel-conv-mnist-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from dfkd_fast.host_memory import retain_freed_host_memory
from dfkd_fast.models.layers import MaxPool2x2
from dfkd_fast.nn import FewChannelConv2d
from harness import device_name, interleaved_step_medians, preset_run
from step_configs import config_problem, parse_override

class MaxPool2x2WithMaxPool2dGradient(MaxPool2x2):
    """MaxPool2x2 as it was: max_pool2d where a gradient is needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return nn.MaxPool2d.forward(self, x)
        return super().forward(x)


# layer -> {name: class}, dfkd_fast's first. Neither class adds state to the other, so a layer's
# class is all that tells the two apart: switching it keeps the parameters (and the optimisers'
# hold on them).
SWAPS = {
    "few_channel_conv": {"FewChannelConv2d": FewChannelConv2d, "nn.Conv2d": nn.Conv2d},
    "max_pool": {"max_pool2x2 kernel": MaxPool2x2, "max_pool2d": MaxPool2x2WithMaxPool2dGradient},
}


def layers_of(run, layer_class: type) -> list[nn.Module]:
    networks = [run.generator, run.teacher, run.student]
    if getattr(run, "replay", None) is not None and hasattr(run.replay, "vae"):
        networks.append(run.replay.vae)
    return [m for net in networks for m in net.modules() if isinstance(m, layer_class)]


def measure(layer: str, preset: str, overrides: dict, device: str, blocks: int,
            steps_per_block: int) -> dict:  # fmt: skip
    run = preset_run(preset, device=device, **{"method": "pre-dfkd", **overrides})
    classes = SWAPS[layer]
    names = list(classes)
    layers = layers_of(run, classes[names[0]])

    def stepper(name: str):
        def step():
            for module in layers:
                module.__class__ = classes[name]
            run.step_function(run, run.config.steps)
            if device == "cuda":
                torch.cuda.synchronize()

        return step

    steppers = {name: stepper(name) for name in names}
    for step in steppers.values():
        step()
    medians = interleaved_step_medians(steppers, blocks, steps_per_block)
    return {"layer": layer, "preset": preset, "overrides": overrides,
            "layers": [repr(module) for module in layers], "median_ms": medians,
            "speedup": medians[names[1]] / medians[names[0]],
            "steps_timed": blocks * steps_per_block}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", required=True, choices=list(SWAPS))
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
    result = measure(arguments.layer, arguments.preset, overrides, arguments.device,
                     arguments.blocks, arguments.steps_per_block)  # fmt: skip
    medians = result["median_ms"]
    print(f"{arguments.preset} on {device_name(arguments.device)}: "
          + ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items())
          + f", speed-up {result['speedup']:.3f}x ({len(result['layers'])} layers)")  # fmt: skip
    if arguments.json:
        report = {"device": device_name(arguments.device), "torch": torch.__version__, **result}
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
