"""Which collection samples the student learns from.

    uniform       every sample equally likely (the baseline)
    top-k         only the `top_fraction` highest-scoring samples, equally likely
    proportional  p_i proportional to exp(z_i / temperature), z the standardised score

With `class_balance`, each class the teacher predicts gets the same total probability, so a
collection dominated by look-alikes of one class still teaches every class. With
`disagreement_weight` > 0 the probabilities are refreshed every `refresh_every` steps: each is
multiplied by 1 + w * d_i / mean(d), d_i the latest KD divergence between student and teacher on
sample i (samples not yet drawn keep the mean), favouring what the student has not learnt yet.
A `uniform_share` of the probability is spread over the whole collection, so that a sharp policy
keeps the breadth of the rest of it.
"""

from __future__ import annotations

import torch

from dfkd_fast.unlabeled.scores import standardised

POLICIES = ("uniform", "top-k", "proportional")


def base_weights(scores: torch.Tensor, policy: str, temperature: float, top_fraction: float):
    if policy == "uniform":
        return torch.ones_like(scores)
    if policy == "top-k":
        count = max(1, round(top_fraction * len(scores)))
        weights = torch.zeros_like(scores)
        weights[scores.topk(count).indices] = 1.0
        return weights
    if policy == "proportional":
        return torch.softmax(standardised(scores) / temperature, dim=0) * len(scores)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def balance_classes(weights: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """Rescales so that every predicted class with any weight holds the same total."""
    totals = torch.zeros(int(predictions.max()) + 1).index_add_(0, predictions, weights)
    present = totals > 0
    share = torch.where(present, 1.0 / (totals * present.sum()), torch.zeros_like(totals))
    return weights * share[predictions]


class RelatednessSampler:
    """Draws collection indices (on the CPU) by a policy over the teacher's relatedness scores."""

    def __init__(self, scores: torch.Tensor, predictions: torch.Tensor, policy: str,
                 temperature: float = 1.0, top_fraction: float = 0.1, class_balance: bool = True,
                 disagreement_weight: float = 0.0, uniform_share: float = 0.0,
                 device="cpu"):  # fmt: skip
        if len(scores) == 0:
            raise ValueError("cannot sample from an empty collection")
        if not 0 <= uniform_share <= 1:
            raise ValueError(f"uniform_share must be in [0, 1], got {uniform_share}")
        self.uniform_share = uniform_share
        weights = base_weights(scores.float().cpu(), policy, temperature, top_fraction)
        if class_balance:
            weights = balance_classes(weights, predictions.cpu())
        self.base = weights / weights.sum()
        self.disagreement_weight = disagreement_weight
        # the latest per-sample divergence, kept on the device: recording it needs no sync
        self.disagreement = torch.full((len(scores),), float("nan"), device=device)
        self.probabilities = self._with_uniform_share(self.base)

    def _with_uniform_share(self, weights: torch.Tensor) -> torch.Tensor:
        probabilities = weights / weights.sum()
        return (1 - self.uniform_share) * probabilities + self.uniform_share / len(probabilities)

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.probabilities, count, replacement=True, generator=generator)

    def record(self, indices: torch.Tensor, divergences: torch.Tensor) -> None:
        if self.disagreement_weight > 0:
            self.disagreement[indices.to(self.disagreement.device)] = divergences.float()

    def refresh(self) -> None:
        """Folds the recorded divergences into the probabilities (one device-to-host copy)."""
        if self.disagreement_weight == 0:
            return
        divergence = self.disagreement.cpu()
        seen = ~divergence.isnan()
        if not seen.any():
            return
        mean = divergence[seen].mean().clamp_min(1e-12)
        relative = torch.where(seen, divergence / mean, torch.ones_like(divergence))
        weights = self.base * (1.0 + self.disagreement_weight * relative)
        self.probabilities = self._with_uniform_share(weights)

    def state_dict(self) -> dict:
        return {"disagreement": self.disagreement, "probabilities": self.probabilities}

    def load_state_dict(self, state: dict) -> None:
        self.disagreement.copy_(state["disagreement"])
        self.probabilities = state["probabilities"].clone()
