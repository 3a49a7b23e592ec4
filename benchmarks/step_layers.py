"""One step of a preset's workload with some of the networks' layers as dfkd_fast computes them
against the same step with those layers as plain PyTorch computes them, on the same parameters:
the two take turns in blocks within one process, on one run (randomly initialised networks,
replay from the first step), so that the machine's drift affects both alike. --layer picks:

    few_channel_conv  FewChannelConv2d (the generator's last convolution, LeNet-5's first)
                      against the nn.Conv2d it derives from
    max_pool          MaxPool2x2 (LeNet-5's pooling) by the max_pool2x2 kernel against
                      max_pool2d where a gradient is needed and the maximum of the four
                      phases elsewhere, as before the kernel
    interleave        UpsampleConv2d (the generator's and the VAE decoder's) with its parity maps
                      interleaved, and their gradient gathered, by the extension's CPU kernels
                      against PyTorch's strided copy of the same views

Run:

    python benchmarks/step_layers.py --layer few_channel_conv --preset mnist --set cpu_amp=false \
        --json benchmarks/results/step-few-channel-conv-mnist-cpu.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.models.layers import MaxPool2x2
from dfkd_fast.nn import FewChannelConv2d, UpsampleConv2d
from dfkd_fast.ops.max_pool import max_of_phases
from dfkd_fast.ops.upsample_conv import (
    deinterleave_by_copy,
    interleave_by_copy,
    parity_kernels,
    tensor_memory_format,
)
from harness import (
    add_step_comparison_arguments,
    compare_step_variants,
    parse_step_comparison,
    preset_run,
    report_step_comparison,
)

class MaxPool2x2WithMaxPool2dGradient(MaxPool2x2):
    """MaxPool2x2 as it was before its kernel: max_pool2d where a gradient is needed, else the
    maximum of the four phases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return nn.MaxPool2d.forward(self, x)
        return max_of_phases(x)


class InterleaveByCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps):
        return interleave_by_copy(maps)

    @staticmethod
    def backward(ctx, grad_output):
        return deinterleave_by_copy(grad_output)


class UpsampleConv2dWithStridedCopy(UpsampleConv2d):
    """UpsampleConv2d as it was: its parity maps interleaved by PyTorch's strided copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = parity_kernels(self.weight).contiguous(memory_format=tensor_memory_format(x))
        bias = None if self.bias is None else self.bias.repeat(4)
        return InterleaveByCopy.apply(F.conv2d(x, kernels, bias, padding=1))


# layer -> {name: class}, dfkd_fast's first. Neither class adds state to the other, so a layer's
# class is all that tells the two apart: switching it keeps the parameters (and the optimisers'
# hold on them).
SWAPS = {
    "few_channel_conv": {"FewChannelConv2d": FewChannelConv2d, "nn.Conv2d": nn.Conv2d},
    "max_pool": {"max_pool2x2 kernel": MaxPool2x2, "max_pool2d": MaxPool2x2WithMaxPool2dGradient},
    "interleave": {"interleave kernels": UpsampleConv2d,
                   "strided copy": UpsampleConv2dWithStridedCopy},  # fmt: skip
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
    layers = layers_of(run, next(iter(classes.values())))

    def switch_to(layer_class: type):
        def switch():
            for module in layers:
                module.__class__ = layer_class

        return switch

    switches = {name: switch_to(layer_class) for name, layer_class in classes.items()}
    return {"layer": layer, "preset": preset, "overrides": overrides,
            "layers": [repr(module) for module in layers],
            **compare_step_variants(run, switches, blocks, steps_per_block)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", required=True, choices=list(SWAPS))
    add_step_comparison_arguments(parser)
    arguments, overrides = parse_step_comparison(parser)
    result = measure(arguments.layer, arguments.preset, overrides, arguments.device,
                     arguments.blocks, arguments.steps_per_block)  # fmt: skip
    report_step_comparison(arguments, result, f" ({len(result['layers'])} layers)")


if __name__ == "__main__":
    main()
