"""The networks: shapes, bad settings, and the pretrained CIFAR-10 teachers' accuracies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfkd_fast.models import (
    cifar_resnet,
    cifar_resnet18,
    cifar_resnet34,
    load_pretrained_cifar_resnet,
    strip_prefix,
)
from dfkd_fast.models.cifar import PRETRAINED_MEAN, PRETRAINED_STD

from .shared import pretrained_resnet_path, shared_path

# Accuracy on cifar10-exact-subset/test_first1000.npz, as shared/models/README.md records it.
RECORDED_ACCURACY = {20: 0.915, 32: 0.928, 44: 0.933, 56: 0.926}


@pytest.mark.parametrize("depth", sorted(RECORDED_ACCURACY))
def test_pretrained_teachers_reproduce_their_recorded_accuracy(depth):
    images = np.load(shared_path("data", "cifar10-exact-subset", "test_first1000.npz"))
    x = torch.tensor(images["images"]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(PRETRAINED_MEAN), torch.tensor(PRETRAINED_STD)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    labels = torch.tensor(images["labels"]).long()
    teacher = load_pretrained_cifar_resnet(pretrained_resnet_path(depth))
    with torch.no_grad():
        accuracy = (teacher(x).argmax(dim=1) == labels).float().mean().item()
    assert accuracy == pytest.approx(RECORDED_ACCURACY[depth], abs=5e-4)


@pytest.mark.parametrize(
    "factory,parameters",
    [(lambda: cifar_resnet(20), 269_722), (lambda: cifar_resnet(56), 853_018),
     (cifar_resnet18, 11_173_962), (cifar_resnet34, 21_282_122)],
)  # fmt: skip
def test_cifar_resnets_map_32x32_images_to_logits(factory, parameters):
    model = factory()
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [0, 7, 21, 100])
def test_cifar_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(depth)


def test_strip_prefix_and_bad_checkpoints(tmp_path):
    assert strip_prefix({"module.a": 1, "b": 2}) == {"a": 1, "b": 2}
    path = tmp_path / "not_a_resnet.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="not a CIFAR ResNet checkpoint"):
        load_pretrained_cifar_resnet(path)
