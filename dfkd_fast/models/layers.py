"""Layers shared by the classifiers."""

from __future__ import annotations

import torch
from torch import nn

from dfkd_fast.nn import UpsampleConv2d
from dfkd_fast.ops import max_pool


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)``, by ``max_pool2x2`` on the CPU (its kernel, or the maximum of the
    four strided phases where no gradient is needed)."""

    def __init__(self):
        super().__init__(kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        return max_pool.max_pool2x2(x)


def separate_upsampling(sequential: nn.Sequential) -> nn.Sequential:
    """The layout before ``UpsampleConv2d``: `sequential` with each one split into
    ``nn.Upsample(scale_factor=2)`` and an ``nn.Conv2d`` holding the very same weight and bias
    tensors (the layout `accept_upsample_layouts` reads)."""
    layers = []
    for layer in sequential:
        if isinstance(layer, UpsampleConv2d):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1,
                             bias=layer.bias is not None)  # fmt: skip
            conv.weight, conv.bias = layer.weight, layer.bias
            layers += [nn.Upsample(scale_factor=2), conv]
        else:
            layers.append(layer)
    return nn.Sequential(*layers)


def accept_upsample_layouts(module: nn.Module, sequential_name: str) -> None:
    """Lets `module` load state dicts saved before each ``UpsampleConv2d`` of its Sequential
    `sequential_name` replaced an ``nn.Upsample`` followed by an ``nn.Conv2d``: the layers then
    counted one more per upsampling, so the keys of the layers after one are renumbered."""
    sequential = getattr(module, sequential_name)
    renumbered, old_index = {}, 0
    for index, layer in enumerate(sequential):
        old_index += 2 if isinstance(layer, UpsampleConv2d) else 1
        renumbered[str(old_index - 1)] = str(index)

    def rename_old_keys(state_dict, prefix, *_):
        start = f"{prefix}{sequential_name}."
        old_keys = [key for key in state_dict if key.startswith(start)]
        if not any(int(key[len(start) :].split(".")[0]) >= len(sequential) for key in old_keys):
            return  # saved with this layout
        for key in old_keys:
            old_index, rest = key[len(start) :].split(".", 1)
            new_key = f"{start}{renumbered.get(old_index, old_index)}.{rest}"
            state_dict[new_key] = state_dict.pop(key)

    module._register_load_state_dict_pre_hook(rename_old_keys)
