"""Argument checks the ops' public functions share."""

from __future__ import annotations

import torch


def check_floating_tensor(name: str, value) -> None:
    """A TypeError naming the argument unless `value` is a floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
