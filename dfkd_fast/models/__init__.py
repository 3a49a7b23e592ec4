"""Networks: classifiers (teachers and students), the image generator and the replay VAE."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from dfkd_fast.models.cifar import (
    CifarResNet,
    cifar_resnet,
    cifar_resnet18,
    cifar_resnet34,
    load_pretrained_cifar_resnet,
    strip_prefix,
)
from dfkd_fast.models.generator import Generator
from dfkd_fast.models.lenet import LeNet5, lenet5, lenet5_half
from dfkd_fast.models.small import small_cnn
from dfkd_fast.models.vae import VAE
from dfkd_fast.models.wrn import WideResNet, wide_resnet

__all__ = [
    "CLASSIFIERS",
    "CifarResNet",
    "Generator",
    "LeNet5",
    "VAE",
    "WideResNet",
    "build_classifier",
    "cifar_resnet",
    "cifar_resnet18",
    "cifar_resnet34",
    "lenet5",
    "lenet5_half",
    "load_pretrained_cifar_resnet",
    "small_cnn",
    "strip_prefix",
    "weights_sha256",
    "wide_resnet",
]

# name -> (factory(num_classes, in_channels), the input size it needs or None for any)
CLASSIFIERS = {
    "lenet5": (lambda k, c: lenet5(k, c), 32),
    "lenet5_half": (lambda k, c: lenet5_half(k, c), 32),
    **{f"resnet{d}": ((lambda d: lambda k, c: cifar_resnet(d, k))(d), None)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet18": (lambda k, c: cifar_resnet18(k), None),
    "resnet34": (lambda k, c: cifar_resnet34(k), None),
    **{f"wrn{d}_{w}": ((lambda d, w: lambda k, c: WideResNet(d, w, k, c))(d, w), None)
       for d in (16, 40) for w in (1, 2)},
    **{f"cnn{w}": ((lambda w: lambda k, c: small_cnn(w, k, c))(w), None) for w in (8, 16, 32)},
}  # fmt: skip


def build_classifier(name: str, num_classes: int, in_channels: int,
                     seed: int | None = None) -> nn.Module:  # fmt: skip
    """A classifier by name: lenet5, lenet5_half, resnet20 ... resnet110, resnet18, resnet34,
    wrn16_1, wrn16_2, wrn40_1, wrn40_2, cnn8, cnn16, cnn32. Its initial weights come from
    `seed` when given (the global random state is left as it was), else from the global state."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(CLASSIFIERS)}")
    if name.startswith(("resnet", "wrn")) and in_channels != 3:
        raise ValueError(f"{name} takes 3-channel images, not {in_channels}")
    if seed is None:
        return CLASSIFIERS[name][0](num_classes, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLASSIFIERS[name][0](num_classes, in_channels)


def weights_sha256(network: nn.Module) -> str:
    """SHA-256 (hex) of the network's state dict, its names and values, whatever the device and
    memory format: the same for the same weights."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
