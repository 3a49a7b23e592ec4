"""Replay memories: what the student rehearses so that it does not forget earlier synthetic data.

- :class:`GenerativeReplay` (PRE-DFKD, Binici et al., AAAI 2022) keeps no sample: a VAE learns
  the synthetic batches as they come (reconstruction in pixel space and in the teacher's output
  space, a small KL weight, and rehearsal of its own samples so that it does not forget either),
  and replays by decoding draws from a Gaussian fitted to its posteriors (or from its prior).
  With `snapshot_every`, it rehearses a frozen copy of itself instead, taken every that many
  updates, in a share that grows with the copies taken (deep generative replay, Shin et al.,
  NeurIPS 2017), so that each part of the run keeps an equal share of what it learns.
- :class:`MemoryBank` stores past synthetic images in a ring buffer and replays random ones, the
  baseline whose memory PRE-DFKD saves.

Both draw all randomness from the `torch.Generator` they are given.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.distill.averaging import warmed_up_weight
from dfkd_fast.models.vae import VAE
from dfkd_fast.ops.kd_div import kd_div


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class GenerativeReplay:
    def __init__(self, image_shape, latent_dim: int, width: int, lr: float, output_weight: float,
                 kl_weight: float, self_replay: float, device, batch_size: int | None = None,
                 autocast=contextlib.nullcontext, memory_format=torch.contiguous_format,
                 fitted_prior: bool = True, prior_decay: float = 0.99,
                 snapshot_every: int = 0):  # fmt: skip
        self.vae = VAE(image_shape, latent_dim, width).to(device, memory_format=memory_format)
        self.snapshot_every = snapshot_every  # 0: rehearse the VAE's own samples
        self.snapshot: VAE | None = None  # the frozen copy rehearsed once snapshot_every > 0
        self.fitted_prior = fitted_prior  # decode replay from the fitted Gaussian, not N(0, I)
        self.prior_decay = prior_decay  # of the fitted Gaussian's moving averages
        self.autocast = autocast  # the forward passes' autocast context (the run's)
        self.batch_size = batch_size  # synthetic images learnt per update (None: all given)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=lr)
        self.output_weight = output_weight
        self.kl_weight = kl_weight
        self.self_replay = self_replay
        self.updates = 0

    def update(self, images, teacher_logits, teacher: nn.Module, generator: torch.Generator):
        """One VAE step on a batch of synthetic images and the teacher's logits on them (and on
        the replay of earlier ones, by the VAE itself or by its frozen snapshot)."""
        images, teacher_logits = images[: self.batch_size], teacher_logits[: self.batch_size]
        if self.snapshot is None:
            rehearsed = round(len(images) * self.self_replay) if self.updates else 0
        else:
            # the snapshot stands for `snapshots` equal parts of the run, the fresh images for one
            share = self.snapshots / (self.snapshots + 1)
            rehearsed = min(round(len(images) * share), len(images) - 1)
            images, teacher_logits = images[rehearsed:], teacher_logits[rehearsed:]
        if rehearsed:
            old_images = self._decode_draws(self.vae if self.snapshot is None else self.snapshot,
                                             rehearsed, generator)
            with torch.no_grad(), self.autocast():
                old_logits = teacher(old_images)
            images = torch.cat([images, old_images.to(images.dtype)])
            teacher_logits = torch.cat([teacher_logits.float(), old_logits.float()])
        self.vae.train()
        fit_weight = warmed_up_weight(self.prior_decay, self.updates)
        with self.autocast():
            reconstruction, kl = self.vae(images, generator=generator, fit_weight=fit_weight)
            output_loss = kd_div(teacher(reconstruction), teacher_logits)
        pixel_loss = F.mse_loss(reconstruction.float(), images)
        kl_per_pixel = kl.float().mean() / images[0].numel()
        loss = pixel_loss + self.output_weight * output_loss + self.kl_weight * kl_per_pixel
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        if self.snapshot_every and self.updates % self.snapshot_every == 0:
            self._take_snapshot()
        return loss.detach()

    @property
    def snapshots(self) -> int:
        """The copies taken so far (the snapshot is the last)."""
        return self.updates // self.snapshot_every if self.snapshot_every else 0

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return self._decode_draws(self.vae, count, generator)

    @torch.no_grad()
    def _decode_draws(self, vae: VAE, count: int, generator: torch.Generator) -> torch.Tensor:
        vae.eval()
        with self.autocast():
            return vae.sample(count, generator=generator, fitted=self.fitted_prior)

    def _take_snapshot(self, weights: dict | None = None) -> None:
        """Freezes a copy of the VAE, or of `weights` (a resumed run's snapshot)."""
        if self.snapshot is None:
            self.snapshot = copy.deepcopy(self.vae).eval().requires_grad_(False)
        self.snapshot.load_state_dict(self.vae.state_dict() if weights is None else weights)

    def memory_bytes(self) -> int:
        vaes = [self.vae] if self.snapshot is None else [self.vae, self.snapshot]
        return sum(tensor_bytes(vae.parameters()) + tensor_bytes(vae.buffers()) for vae in vaes)

    def state_dict(self) -> dict:
        snapshot = self.snapshot.state_dict() if self.snapshot is not None else None
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "updates": self.updates, "snapshot": snapshot}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if "fitted_scale" not in state["vae"]:
            raise ValueError(
                "the checkpoint was written by an earlier dfkd_fast, whose VAE replayed from "
                "N(0, I) with no fitted Gaussian: it cannot be resumed to the same result; start "
                "a new run"
            )
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        if state.get("snapshot") is not None:
            self._take_snapshot(state["snapshot"])


class MemoryBank:
    def __init__(self, image_shape, capacity: int, device):
        self.images = torch.empty(capacity, *image_shape, device=device)
        self.filled = 0  # host-side counts: no sync to know them
        self.next_slot = 0

    def update(self, images, teacher_logits, teacher: nn.Module, generator: torch.Generator):
        """Stores a batch, overwriting the oldest images once full."""
        capacity = len(self.images)
        images = images.detach()[-capacity:]
        slots = (torch.arange(len(images), device=images.device) + self.next_slot) % capacity
        self.images[slots] = images
        self.next_slot = (self.next_slot + len(images)) % capacity
        self.filled = min(capacity, self.filled + len(images))
        return None

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        if self.filled == 0:
            raise RuntimeError("the memory bank is empty: store a batch before sampling")
        index = torch.randint(self.filled, (count,), generator=generator, device=self.images.device)
        return self.images[index]

    def memory_bytes(self) -> int:
        return tensor_bytes([self.images])

    def state_dict(self) -> dict:
        return {"images": self.images[: self.filled].clone() if self.filled < len(self.images)
                else self.images, "next_slot": self.next_slot}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        stored = state["images"]
        self.images[: len(stored)] = stored.to(self.images.device)
        self.filled = len(stored)
        self.next_slot = int(state["next_slot"])
