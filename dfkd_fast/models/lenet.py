"""LeNet-5 for 32x32 images, as used by DAFL (Chen et al., "Data-Free Learning of Student
Networks", ICCV 2019): three 5x5 convolutions (the first two followed by 2x2 max-pooling), two
fully connected layers, ReLU throughout, no BatchNorm. LeNet-5-half halves every width."""

from __future__ import annotations

import torch
from torch import nn

from dfkd_fast.models.layers import MaxPool2x2
from dfkd_fast.nn import FewChannelConv2d


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        c1, c2, c3, f1 = (max(1, int(round(w * width))) for w in (6, 16, 120, 84))
        self.features = nn.Sequential(
            FewChannelConv2d(in_channels, c1, 5), nn.ReLU(), MaxPool2x2(),  # 32 -> 28 -> 14
            nn.Conv2d(c1, c2, 5), nn.ReLU(), MaxPool2x2(),  # 14 -> 10 -> 5
            nn.Conv2d(c2, c3, 5), nn.ReLU(),  # 5 -> 1
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3, f1), nn.ReLU(),
                                        nn.Linear(f1, num_classes))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"LeNet-5 takes 32x32 images, got {tuple(x.shape[-2:])}")
        return self.classifier(self.features(x))


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    return LeNet5(num_classes, in_channels, 1.0)


def lenet5_half(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    return LeNet5(num_classes, in_channels, 0.5)
