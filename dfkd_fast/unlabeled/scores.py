"""How related each unlabeled sample is to the teacher's task: one number per sample, higher
means more related. Scoring a collection is batched, shows progress and is cached by sample index.

    msp            max softmax probability (Hendrycks & Gimpel, 2017)
    entropy        minus the entropy of the teacher's prediction
    energy         logsumexp of the logits, minus the free energy (Liu et al., 2020)
    odin           max softmax at temperature 1000 after a small input step that raises it
                   (Liang et al., 2018); one teacher backward per batch
    bn-typicality  minus how far the sample's per-channel feature statistics fall from the
                   teacher's BatchNorm running statistics, summed over layers, each layer scaled
                   by the distance that Gaussian noise inputs give (white-box, no data needed);
                   per-sample statistics by the fused bn_stats kernel in the same teacher pass
    energy+bn-typicality  the sum of the two, each standardised over the collection; both come
                   from the same teacher pass
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dfkd_fast.devices import available_device
from dfkd_fast.hooks import batchnorm_layers
from dfkd_fast.io import atomic_torch_save, load_checkpoint
from dfkd_fast.models import weights_sha256
from dfkd_fast.ops.bn_stats import bn_stats
from dfkd_fast.stopping import RunStopped, deferred_stop_signals

ODIN_TEMPERATURE = 1000.0
ODIN_STEP = 0.0014
NOISE_CALIBRATION_SAMPLES = 256
# the noise is fixed, so that scores depend on the teacher and the collection only (the cache key)
NOISE_CALIBRATION_SEED = 0


def msp(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(dim=1).amax(dim=1)


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = logits.float().log_softmax(dim=1)
    return (log_probs.exp() * log_probs).sum(dim=1)


def energy(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().logsumexp(dim=1)


def odin(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, plain logits): the input moves by ODIN_STEP in the direction that raises the
    temperature-scaled max softmax."""
    images = images.detach().requires_grad_(True)
    logits = teacher(images)
    log_probs = (logits.float() / ODIN_TEMPERATURE).log_softmax(dim=1)
    (gradient,) = torch.autograd.grad(log_probs.amax(dim=1).sum(), images)
    with torch.no_grad():
        shifted = teacher(images + ODIN_STEP * gradient.sign())
        scores = (shifted.float() / ODIN_TEMPERATURE).softmax(dim=1).amax(dim=1)
    return scores, logits.detach()


class BNTypicality:
    """Per-sample distances to the BatchNorm running statistics of every layer with spatial
    inputs; `calibrate` sets each layer's scale to the mean distance of Gaussian noise."""

    def __init__(self, teacher: nn.Module):
        self.layers = batchnorm_layers(teacher)
        if not self.layers:
            raise ValueError("bn-typicality needs a teacher with BatchNorm layers; this one has "
                             "none (use msp, entropy, energy or odin)")  # fmt: skip
        self.teacher = teacher
        self.scales = torch.ones(len(self.layers))
        self._distances: list[torch.Tensor | None] = []

    def _hook(self, index: int):
        def record(layer, inputs):
            x = inputs[0]
            if x.dim() < 3 or x[0, 0].numel() < 2:
                return
            batch, channels = x.shape[:2]
            # each (sample, channel) pair as a channel of one sample: per-sample statistics
            mean, var = bn_stats(x.reshape(1, batch * channels, -1))
            mean, var = mean.view(batch, channels), var.view(batch, channels)
            distance = (mean - layer.running_mean).norm(dim=1) + (var - layer.running_var).norm(dim=1)
            self._distances[index] = distance

        return record

    @torch.no_grad()
    def distances(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((batch, layers) distances, logits) from one teacher pass."""
        self._distances = [None] * len(self.layers)
        handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in
                   enumerate(self.layers)]  # fmt: skip
        try:
            logits = self.teacher(images)
        finally:
            for handle in handles:
                handle.remove()
        used = [d if d is not None else torch.zeros(len(images), device=images.device)
                for d in self._distances]  # fmt: skip
        return torch.stack(used, dim=1).float(), logits

    def calibrate(self, image_shape, device, generator: torch.Generator) -> None:
        noise = torch.randn(NOISE_CALIBRATION_SAMPLES, *image_shape, generator=generator)
        distances, _ = self.distances(noise.to(device))
        self.scales = distances.mean(dim=0).clamp_min(1e-6).cpu()

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances, logits = self.distances(images)
        return -(distances / self.scales.to(distances.device)).mean(dim=1), logits


def standardised(scores: torch.Tensor) -> torch.Tensor:
    return (scores - scores.mean()) / scores.std().clamp_min(1e-12)


def energy_plus_bn_typicality(logits: torch.Tensor, typicality: torch.Tensor) -> torch.Tensor:
    """The energy of `logits` and the BN-typicality scores, each standardised, summed."""
    return standardised(energy(logits)) + standardised(typicality)


SCORES = ("msp", "entropy", "energy", "odin", "bn-typicality", "energy+bn-typicality")
_USES_BN_TYPICALITY = ("bn-typicality", "energy+bn-typicality")
_FROM_LOGITS = {"msp": msp, "entropy": negative_entropy, "energy": energy}
PARTIAL_EVERY_BATCHES = 50  # how often the scores so far are kept, so a crash loses at most these


@dataclass
class ScoredCollection:
    scores: torch.Tensor  # (N,) float32, higher = more related
    teacher_logits: torch.Tensor  # (N, classes) float32, on the unmixed samples
    score: str

    @property
    def predictions(self) -> torch.Tensor:
        return self.teacher_logits.argmax(dim=1)


def score_collection(teacher: nn.Module, collection, score: str = "msp", batch_size: int = 512,
                     device="cpu", cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> ScoredCollection:  # fmt: skip
    """Scores and teacher logits of every sample of `collection`, in index order; with
    `cache_dir`, reused when the same teacher has scored the same collection before.

    With `cache_dir`, the batches scored so far are also kept there (every
    ``PARTIAL_EVERY_BATCHES`` batches and, on SIGINT or SIGTERM, after the batch under way, which
    then raises :class:`~dfkd_fast.stopping.RunStopped`), and a later call goes on from them."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = available_device(device)
    cache_path = partial_path = None
    scores, logits, first = [], [], 0
    if cache_dir is not None:
        key = f"{collection.fingerprint()}-{weights_sha256(teacher)[:16]}-{score}"
        cache_path = Path(cache_dir) / f"scores-{key}.pt"
        partial_path = Path(cache_dir) / f"scores-{key}.partial.pt"
        if cache_path.exists():
            cached = load_checkpoint(cache_path)
            return ScoredCollection(cached["scores"], cached["teacher_logits"], score)
        if partial_path.exists():
            partial = load_checkpoint(partial_path)
            scores, logits = [partial["scores"]], [partial["teacher_logits"]]
            first = len(partial["scores"])
    teacher = teacher.to(device).eval()
    typicality = None
    if score in _USES_BN_TYPICALITY:
        typicality = BNTypicality(teacher)
        calibration = torch.Generator().manual_seed(NOISE_CALIBRATION_SEED)
        typicality.calibrate(collection.image_shape, device, calibration)

    def save_partial() -> None:
        partial_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(partial_path, {"scores": torch.cat(scores),
                                         "teacher_logits": torch.cat(logits)})  # fmt: skip

    starts = range(first, len(collection), batch_size)
    bar = tqdm(starts, desc=f"scoring ({score})", unit="batch", disable=not progress)
    with deferred_stop_signals(partial_path is not None) as stop_signal:
        for batch_number, start in enumerate(bar, 1):
            end = min(start + batch_size, len(collection))
            images = collection.batch(torch.arange(start, end)).to(device)
            if score == "odin":
                with torch.enable_grad():
                    batch_scores, batch_logits = odin(teacher, images)
            elif typicality is not None:
                batch_scores, batch_logits = typicality(images)
            else:
                with torch.no_grad():
                    batch_logits = teacher(images)
                batch_scores = _FROM_LOGITS[score](batch_logits)
            scores.append(batch_scores.float().cpu())
            logits.append(batch_logits.float().cpu())
            stopped_by = stop_signal() if end < len(collection) else None
            if partial_path is not None and (stopped_by or batch_number % PARTIAL_EVERY_BATCHES == 0):
                save_partial()
            if stopped_by:
                bar.close()
                raise RunStopped(stopped_by, end, len(collection), partial_path, unit="sample")
    scores, logits = torch.cat(scores), torch.cat(logits)
    if score == "energy+bn-typicality":
        scores = energy_plus_bn_typicality(logits, scores)
    result = ScoredCollection(scores, logits, score)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(cache_path, {"scores": result.scores,
                                       "teacher_logits": result.teacher_logits})  # fmt: skip
        partial_path.unlink(missing_ok=True)
    return result
