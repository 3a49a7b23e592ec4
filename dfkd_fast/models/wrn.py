"""Wide ResNets for 32x32 images (Zagoruyko & Komodakis, "Wide Residual Networks", 2016):
WRN-depth-k has (depth - 4) / 6 pre-activation basic blocks per stage and widths 16k, 32k, 64k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or widen < 1:
            raise ValueError(f"need depth = 6n + 4 >= 10 and widen >= 1, got {depth}, {widen}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for stage in range(3):
            for block in range(blocks):
                stride = 2 if block == 0 and stage > 0 else 1
                in_width = widths[stage] if block == 0 else widths[stage + 1]
                stages.append(_PreActBlock(in_width, widths[stage + 1], stride))
        self.blocks = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wide_resnet(depth: int, widen: int, num_classes: int = 10) -> WideResNet:
    return WideResNet(depth, widen, num_classes)
