"""ResNets for 32x32 images.

* ``cifar_resnet(depth)``: the depth = 6n + 2 family of He et al. ("Deep Residual Learning for Image
  Recognition", 2016, section 4.2): 16/32/64 channels, n basic blocks per stage, parameter-free
  "option A" shortcuts (subsample by 2, zero-pad the new channels). ResNet-20/32/44/56 load the
  pretrained CIFAR-10 teachers of shared/models/cifar10-resnet after their "module." prefix is
  stripped (``load_pretrained_cifar_resnet``).
* ``cifar_resnet18``, ``cifar_resnet34``: the ImageNet layouts (64 to 512 channels, 1x1 projection
  shortcuts) with a 3x3 stride-1 stem and no max-pool, as used as CIFAR teachers and students in
  data-free distillation papers.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.io import load_checkpoint

# Input normalisation the shared pretrained teachers were trained with (pixels in [0, 1]).
PRETRAINED_MEAN = (0.485, 0.456, 0.406)
PRETRAINED_STD = (0.229, 0.224, 0.225)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: x[:, :, ::2, ::2] with the extra channels zero-padded on both sides."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if projection:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )
            else:
                self.shortcut = ZeroPadShortcut(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, stages of basic blocks (the first of each later stage strides 2), global average
    pooling, a linear classifier."""

    def __init__(
        self,
        blocks_per_stage: list[int],
        widths: list[int],
        num_classes: int = 10,
        projection_shortcuts: bool = False,
        in_channels: int = 3,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for index, (count, width) in enumerate(zip(blocks_per_stage, widths)):
            blocks = []
            for block in range(count):
                stride = 2 if block == 0 and index > 0 else 1
                blocks.append(BasicBlock(channels, width, stride, projection_shortcuts))
                channels = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.linear = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            out = getattr(self, f"layer{index + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """ResNet-`depth` for CIFAR, depth = 6n + 2 (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], [16, 32, 64], num_classes)


def cifar_resnet18(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, projection_shortcuts=True)


def cifar_resnet34(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, projection_shortcuts=True)


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """The state dict with `prefix` removed from the keys that start with it (DataParallel)."""
    return {key[len(prefix):] if key.startswith(prefix) else key: value
            for key, value in state_dict.items()}  # fmt: skip


def load_pretrained_cifar_resnet(path: str | os.PathLike, num_classes: int = 10) -> CifarResNet:
    """A 6n + 2 CIFAR ResNet with the weights of a checkpoint like shared/models/cifar10-resnet's
    (a dict with "state_dict", or a state dict), loaded with weights_only=True, in eval mode."""
    checkpoint = load_checkpoint(path)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{str(path)!r} holds no state dict")
    state_dict = strip_prefix(state_dict)
    blocks = {int(m.group(1)) for key in state_dict if (m := re.match(r"layer1\.(\d+)\.", key))}
    if not blocks:
        raise ValueError(f"{str(path)!r} is not a CIFAR ResNet checkpoint (no layer1 blocks)")
    model = cifar_resnet(6 * (max(blocks) + 1) + 2, num_classes)
    model.load_state_dict(state_dict)
    return model.eval()
