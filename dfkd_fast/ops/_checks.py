"""Argument checks the ops' public functions share."""

from __future__ import annotations

import torch


def check_floating_tensor(name: str, value) -> None:
    """A TypeError naming the argument unless `value` is a floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()


def check_layer_tensors(x, weight, bias) -> None:
    """A convolution's x, weight and optional bias: floating-point tensors on x's device, of x's
    dtype unless autocast is on there (which casts them as it casts ``conv2d``'s)."""
    for name, value in (("x", x), ("weight", weight), ("bias", bias)):
        if value is None and name == "bias":
            continue
        check_floating_tensor(name, value)
        if value.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {value.device}")
        if value.dtype != x.dtype and not autocast_enabled(x.device.type):
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {value.dtype}")
