"""An exponential moving average of the student's weights (Polyak averaging): the averaged copy
is the student a run evaluates and keeps, while the optimizer goes on updating the original.
Averaging removes most of the step-to-step noise that the adversarial generator and the replay
put into the student's weights, without looking at any validation data."""

from __future__ import annotations

import copy

import torch
from torch import nn


def warmed_up_weight(decay: float, updates: int) -> float:
    """The weight of the newest value in a moving average with `decay` at update count
    `updates` (the caller's count): ``1 - min(decay, (1 + updates) / (10 + updates))``, larger
    early on, so that the first values are not lost in the starting value."""
    return 1 - min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """``average = decay * average + (1 - decay) * weights`` after every update, with the decay
    warmed up by :func:`warmed_up_weight` (the count includes the update being made) so the first
    updates are not lost in the random initialisation. Floating-point buffers (BatchNorm
    statistics) are averaged too, the others copied."""

    def __init__(self, network: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.updates = 0
        # load_state_dict copies in place, so these tensors stay the network's for good
        self._tensors = [*self.network.parameters(), *self.network.buffers()]
        self._floating = [i for i, tensor in enumerate(self._tensors) if tensor.is_floating_point()]
        self._others = [i for i, tensor in enumerate(self._tensors) if not tensor.is_floating_point()]

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.updates += 1
        weight = warmed_up_weight(self.decay, self.updates)
        current = [tensor.detach() for tensor in (*network.parameters(), *network.buffers())]
        if len(current) != len(self._tensors):
            raise ValueError("the network does not have the averaged network's tensors")
        torch._foreach_lerp_([self._tensors[i] for i in self._floating],
                             [current[i] for i in self._floating], weight)  # fmt: skip
        for i in self._others:
            self._tensors[i].copy_(current[i])

    def state_dict(self) -> dict:
        return {"network": self.network.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.updates = int(state["updates"])
