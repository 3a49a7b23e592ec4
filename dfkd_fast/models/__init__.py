"""Networks: classifiers (teachers and students) and the image generator."""

from dfkd_fast.models.cifar import (
    CifarResNet,
    cifar_resnet,
    cifar_resnet18,
    cifar_resnet34,
    load_pretrained_cifar_resnet,
    strip_prefix,
)
from dfkd_fast.models.small import Generator, small_cnn

__all__ = [
    "CifarResNet",
    "Generator",
    "cifar_resnet",
    "cifar_resnet18",
    "cifar_resnet34",
    "load_pretrained_cifar_resnet",
    "small_cnn",
    "strip_prefix",
]
