"""The image generator of data-free distillation, DCGAN/DAFL style (Chen et al., ICCV 2019):
latent -> linear -> (2w, H', W') -> upsample, conv, BN, LeakyReLU -> upsample, conv, BN,
LeakyReLU -> conv to the image channels -> tanh -> centre crop to H x W -> non-affine BatchNorm,
so that images come out standardised like a classifier's normalised inputs. H' = ceil(H / 4), so
any size of at least 4 x 4 works. Each upsample-conv pair is one UpsampleConv2d, which
convolves before upsampling (dfkd_fast/ops/upsample_conv.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dfkd_fast.models.layers import accept_upsample_layouts
from dfkd_fast.nn import FewChannelConv2d, UpsampleConv2d
from dfkd_fast.ops.upsample_conv import tensor_memory_format

MIN_IMAGE_SIZE = 4


def check_image_shape(image_shape) -> tuple[int, int, int]:
    if len(image_shape) != 3 or not all(isinstance(s, int) for s in image_shape):
        raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
    channels, height, width = image_shape
    if channels < 1 or height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise ValueError(
            f"the generator makes images of at least 1 channel and {MIN_IMAGE_SIZE}x"
            f"{MIN_IMAGE_SIZE} pixels, got {tuple(image_shape)}"
        )
    return tuple(image_shape)


def memory_format_of(layers: nn.Module) -> torch.memory_format:
    """channels_last if the first convolution of `layers` has had its weight moved to it, else
    contiguous: the layout to give a seed tensor built by a view, so that the layers after it
    copy nothing."""
    first_conv = next(m for m in layers.modules() if isinstance(m, nn.Conv2d))
    return tensor_memory_format(first_conv.weight)


class Generator(nn.Module):
    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        channels, height, width_px = check_image_shape(image_shape)
        if latent_dim < 1 or width < 1:
            raise ValueError(f"need latent_dim >= 1 and width >= 1, got {latent_dim}, {width}")
        self.latent_dim = latent_dim
        self.image_shape = (channels, height, width_px)
        self.seed_shape = (2 * width, math.ceil(height / 4), math.ceil(width_px / 4))
        self.project = nn.Linear(latent_dim, math.prod(self.seed_shape))
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            UpsampleConv2d(2 * width, 2 * width),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            UpsampleConv2d(2 * width, width),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            FewChannelConv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )
        self.standardise = nn.BatchNorm2d(channels, affine=False)
        accept_upsample_layouts(self, "body")

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        seed = self.project(latent).view(latent.shape[0], *self.seed_shape)
        seed = seed.contiguous(memory_format=memory_format_of(self.body))
        images = self.body(seed)  # (batch, channels, 4 H', 4 W')
        _, height, width = self.image_shape
        top = (images.shape[-2] - height) // 2
        left = (images.shape[-1] - width) // 2
        return self.standardise(images[..., top : top + height, left : left + width])
