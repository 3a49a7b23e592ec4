"""A small BatchNorm CNN classifier for small images (the digits example's teacher and student)."""

from __future__ import annotations

import torch
from torch import nn

from dfkd_fast.models.layers import MaxPool2x2


def small_cnn(width: int, num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Three 3x3 conv-BN-ReLU layers (width, 2 width, 2 width), one 2x2 max-pool, global
    average pooling and a linear classifier. Any input size of at least 2x2."""
    if width < 1 or num_classes < 2 or in_channels < 1:
        raise ValueError(
            f"need width >= 1, num_classes >= 2 and in_channels >= 1, got {width}, "
            f"{num_classes}, {in_channels}"
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        MaxPool2x2(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
