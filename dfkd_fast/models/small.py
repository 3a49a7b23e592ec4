"""Small networks for small images: a BatchNorm CNN classifier and a DCGAN-style generator."""

from __future__ import annotations

import torch
from torch import nn


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
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class Generator(nn.Module):
    """Latent vector -> image, DCGAN/DAFL style: a linear layer to a (width, H/2, W/2) map,
    one 2x nearest upsampling, conv-BN-LeakyReLU, and a conv to the image channels followed by
    a non-affine BatchNorm, so that outputs come out standardised like normalised inputs."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        channels, height, width_px = image_shape
        if height % 2 or width_px % 2 or min(image_shape) < 1:
            raise ValueError(
                f"the generator makes images of even height and width, got {tuple(image_shape)}"
            )
        if latent_dim < 1 or width < 1:
            raise ValueError(f"need latent_dim >= 1 and width >= 1, got {latent_dim}, {width}")
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        self.seed_shape = (width, height // 2, width_px // 2)
        self.project = nn.Linear(latent_dim, width * (height // 2) * (width_px // 2))
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        seed = self.project(latent).view(latent.shape[0], *self.seed_shape)
        return self.body(seed)  # (batch, channels, height, width)
