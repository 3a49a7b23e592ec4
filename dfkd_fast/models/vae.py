"""The variational autoencoder of generative pseudo replay (PRE-DFKD, Binici et al., AAAI 2022):
it learns the synthetic samples seen so far, and its decoder replays them. Encoder: two stride-2
convolutions and a linear layer to (mu, logvar); decoder: the generator's architecture without
its final normalisation. Sampling goes through dfkd_fast.reparameterize.

Replay samples are decoded from a Gaussian fitted to the encoder's posteriors of the images learnt
so far (ex-post density estimation, Ghosh et al., ICLR 2020), or from the N(0, I) prior. With the
small KL weight replay needs for sharp reconstructions, the posteriors sit far from N(0, I), and
decoding prior draws gives blurred blobs that the teacher labels almost uniformly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.models.generator import check_image_shape, memory_format_of
from dfkd_fast.models.layers import accept_upsample_layouts
from dfkd_fast.nn import UpsampleConv2d
from dfkd_fast.ops.reparameterize import reparameterize, sample_prior


class VAE(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 64, width: int = 32):
        super().__init__()
        channels, height, width_px = check_image_shape(image_shape)
        if latent_dim < 1 or width < 1:
            raise ValueError(f"need latent_dim >= 1 and width >= 1, got {latent_dim}, {width}")
        self.image_shape = (channels, height, width_px)
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )  # fmt: skip
        encoded = 2 * width * math.ceil(height / 4) * math.ceil(width_px / 4)
        self.to_moments = nn.Linear(encoded, 2 * latent_dim)
        self.seed_shape = (2 * width, math.ceil(height / 4), math.ceil(width_px / 4))
        self.project = nn.Linear(latent_dim, math.prod(self.seed_shape))
        self.decoder = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            UpsampleConv2d(2 * width, width),
            nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            UpsampleConv2d(width, channels),
        )  # fmt: skip
        accept_upsample_layouts(self, "decoder")
        # the fitted Gaussian: moving averages of the posteriors' mean and second moment, and the
        # Cholesky factor of the covariance they give
        self.register_buffer("fitted_mean", torch.zeros(latent_dim))
        self.register_buffer("fitted_second_moment", torch.eye(latent_dim))
        self.register_buffer("fitted_scale", torch.eye(latent_dim))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padded = _pad_to_multiple_of_4(images)
        mu, logvar = self.to_moments(self.encoder(padded)).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        seed = self.project(latent).view(latent.shape[0], *self.seed_shape)
        out = self.decoder(seed.contiguous(memory_format=memory_format_of(self.decoder)))
        _, height, width = self.image_shape
        return out[..., :height, :width]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                fit_weight: float = 0.0):  # fmt: skip
        """(reconstruction, kl per sample) of a batch of images. With `fit_weight` > 0, the
        fitted Gaussian moves that far towards the moments of this batch's posteriors."""
        mu, logvar = self.encode(images)
        if fit_weight > 0:
            self._fit(mu.detach().float(), logvar.detach().float(), fit_weight)
        latent, kl = reparameterize(mu, logvar, generator=generator, return_kl=True)
        return self.decode(latent), kl

    @torch.no_grad()
    def _fit(self, mu: torch.Tensor, logvar: torch.Tensor, weight: float) -> None:
        """Moment matching of the mixture of the posteriors N(mu_i, diag(exp(logvar_i))), in
        float32 whatever the autocast."""
        with torch.autocast(mu.device.type, enabled=False):
            second_moment = (mu.T @ mu + torch.diag(logvar.exp().sum(dim=0))) / len(mu)
            self.fitted_mean.lerp_(mu.mean(dim=0), weight)
            self.fitted_second_moment.lerp_(second_moment, weight)
            covariance = self.fitted_second_moment - torch.outer(self.fitted_mean, self.fitted_mean)
            jitter = 1e-4 * covariance.diagonal().mean().clamp_min(1e-6)
            identity = torch.eye(self.latent_dim, device=mu.device)
            # cholesky_ex does not check the result on the host: no device sync
            self.fitted_scale.copy_(torch.linalg.cholesky_ex(covariance + jitter * identity).L)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None,
               fitted: bool = True) -> torch.Tensor:  # fmt: skip
        """`count` images decoded from the fitted Gaussian (or the prior), the replay samples."""
        device = self.project.weight.device
        latent = sample_prior(count, self.latent_dim, generator=generator, device=device)
        if fitted:
            latent = torch.addmm(self.fitted_mean, latent, self.fitted_scale.T)
        return self.decode(latent)


def _pad_to_multiple_of_4(images: torch.Tensor) -> torch.Tensor:
    height, width = images.shape[-2:]
    return F.pad(images, (0, -width % 4, 0, -height % 4))
