"""The networks: shapes, bad settings, and the pretrained CIFAR-10 teachers' accuracies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfkd_fast.models import (
    VAE,
    Generator,
    build_classifier,
    cifar_resnet,
    cifar_resnet18,
    cifar_resnet34,
    lenet5,
    load_pretrained_cifar_resnet,
    strip_prefix,
)
from dfkd_fast.models.cifar import PRETRAINED_MEAN, PRETRAINED_STD
from dfkd_fast.ops.reparameterize import sample_prior

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


@pytest.mark.parametrize(
    "name, image_shape, parameters",
    [("lenet5", (1, 32, 32), 61_706), ("lenet5_half", (1, 32, 32), 15_738),
     ("wrn16_1", (3, 32, 32), 175_066), ("wrn40_2", (3, 32, 32), 2_243_546),
     ("resnet18", (3, 32, 32), 11_173_962), ("cnn8", (1, 8, 8), 3_818)],
)  # fmt: skip
def test_classifiers_by_name(name, image_shape, parameters):
    torch.manual_seed(0)
    model = build_classifier(name, 10, image_shape[0])
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.randn(3, *image_shape)).shape == (3, 10)


def test_a_seeded_classifier_is_reproducible_and_leaves_the_global_random_state():
    state = torch.random.get_rng_state()
    first = build_classifier("lenet5_half", 10, 1, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = build_classifier("lenet5_half", 10, 1, seed=3)
    other = build_classifier("lenet5_half", 10, 1, seed=4)
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_classifier_names_and_inputs_are_checked():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_classifier("vgg", 10, 3)
    with pytest.raises(ValueError, match="takes 3-channel images"):
        build_classifier("resnet20", 10, 1)
    with pytest.raises(ValueError, match="32x32 images"):
        build_classifier("lenet5", 10, 1)(torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (1, 32, 32), (3, 32, 32), (2, 7, 13)])
def test_generator_and_vae_make_images_of_any_shape(image_shape):
    torch.manual_seed(0)
    generator = Generator(16, image_shape, width=8)
    images = generator(torch.randn(5, 16))
    assert images.shape == (5, *image_shape)
    # the last, non-affine BatchNorm standardises each channel of a training batch
    flat = images.transpose(0, 1).reshape(image_shape[0], -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(image_shape[0]), atol=1e-5, rtol=0)
    vae = VAE(image_shape, latent_dim=6, width=4)
    reconstruction, kl = vae(images.detach(), generator=torch.Generator().manual_seed(0))
    assert reconstruction.shape == images.shape and kl.shape == (5,) and (kl >= 0).all()
    first = vae.eval().sample(4, torch.Generator().manual_seed(3))
    second = vae.sample(4, torch.Generator().manual_seed(3))
    assert first.shape == (4, *image_shape) and torch.equal(first, second)


def test_vae_kl_is_the_closed_form_of_its_moments():
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), latent_dim=5, width=4).eval()
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    vae.double()
    mu, logvar = vae.encode(images)
    _, kl = vae(images, generator=torch.Generator().manual_seed(0))
    expected = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_vae_fits_a_gaussian_to_its_posteriors(autocast):
    """Moments of the mixture of the batch's posteriors, against a float64 reference, then a
    moving average of them; kept in float32 under bfloat16 autocast."""
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), latent_dim=5, width=4).train()
    batches = [torch.randn(37, 1, 8, 8) * 2 + 1 for _ in range(2)]
    expected_mean = torch.zeros(5, dtype=torch.float64)
    expected_second = torch.eye(5, dtype=torch.float64)
    for images, weight in zip(batches, (1.0, 0.3)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            mu, logvar = (t.double() for t in vae.encode(images))
            vae(images, generator=torch.Generator().manual_seed(0), fit_weight=weight)
        second = (mu.T @ mu + torch.diag(logvar.exp().sum(0))) / len(mu)
        expected_mean = (1 - weight) * expected_mean + weight * mu.mean(0)
        expected_second = (1 - weight) * expected_second + weight * second
    covariance = expected_second - torch.outer(expected_mean, expected_mean)
    assert vae.fitted_scale.dtype == torch.float32
    torch.testing.assert_close(vae.fitted_mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    scale = vae.fitted_scale.double()
    assert torch.equal(scale, scale.tril())
    jitter = 1e-4 * covariance.diagonal().mean()
    torch.testing.assert_close(scale @ scale.T, covariance + jitter * torch.eye(5),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    # without fit_weight the fit stays as it is
    before = vae.fitted_scale.clone()
    vae(batches[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae.fitted_scale, before)


def test_vae_samples_decode_the_fitted_gaussian_or_the_prior(monkeypatch):
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), latent_dim=3, width=4).eval()
    vae.fitted_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    vae.fitted_scale.copy_(torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, -1.0, 1.0]]))
    monkeypatch.setattr(vae, "decode", lambda latent: latent)
    latent = vae.sample(20000, torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(latent.mean(0), vae.fitted_mean.double(), atol=0.05, rtol=0)
    scale = vae.fitted_scale.double()
    torch.testing.assert_close(latent.T.cov(correction=0), scale @ scale.T, atol=0.08, rtol=0)
    prior = vae.sample(5, torch.Generator().manual_seed(1), fitted=False)
    noise = sample_prior(5, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(prior, noise)
    torch.testing.assert_close(latent[:5].float(), vae.fitted_mean + noise @ vae.fitted_scale.T)


@pytest.mark.parametrize("image_shape", [(1, 3, 8), (0, 8, 8), (1, 8), (1.0, 8, 8)])
def test_generator_refuses_shapes_it_cannot_make(image_shape):
    with pytest.raises(ValueError, match="image"):
        Generator(16, image_shape)


def _layouts_seen_by(module: torch.nn.Module) -> list[bool]:
    """Whether each input that reaches `module` is channels_last (recorded by a forward hook)."""
    seen = []
    module.register_forward_hook(
        lambda _, inputs, __: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)
                                          and not inputs[0].is_contiguous()))  # fmt: skip
    return seen


@pytest.mark.parametrize("autocast", [False, True])
def test_channels_last_generator_and_vae_decode_in_that_layout_to_the_same_images(autocast):
    torch.manual_seed(0)
    contiguous = Generator(16, (3, 12, 12), width=8).eval()
    vae_contiguous = VAE((3, 12, 12), latent_dim=6, width=4).eval()
    channels_last = Generator(16, (3, 12, 12), width=8).eval()
    vae_channels_last = VAE((3, 12, 12), latent_dim=6, width=4).eval()
    channels_last.load_state_dict(contiguous.state_dict())
    vae_channels_last.load_state_dict(vae_contiguous.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    vae_channels_last.to(memory_format=torch.channels_last)
    # the seed a view builds follows the convolutions' layout, so no layer converts it
    body_layouts = _layouts_seen_by(channels_last.body[1])
    decoder_layouts = _layouts_seen_by(vae_channels_last.decoder[0])
    contiguous_layouts = _layouts_seen_by(contiguous.body[1])
    latent = torch.randn(7, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pairs = [(contiguous(latent), channels_last(latent)),
                 (vae_contiguous.decode(latent[:, :6]), vae_channels_last.decode(latent[:, :6]))]  # fmt: skip
    assert body_layouts == [True] and decoder_layouts == [True] and contiguous_layouts == [False]
    for expected, actual in pairs:
        assert actual.is_contiguous(memory_format=torch.channels_last)
        tolerance = 2e-2 if autocast else 1e-5
        torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 6, 28, 28), (3, 5, 9, 7), (2, 1, 2, 3), (5, 3, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_2x2_equals_max_pool2d_with_and_without_gradients(dtype, shape, channels_last):
    from dfkd_fast.models.layers import MaxPool2x2

    torch.manual_seed(0)
    images = (torch.randn(shape, dtype=torch.float64) * 50).round().to(dtype)  # ties included
    images.view(-1)[::17] = float("nan")
    images.view(-1)[5::23] = float("-inf")
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    pool, reference = MaxPool2x2(), torch.nn.MaxPool2d(2)
    with torch.no_grad():
        fast = pool(images)
    expected = reference(images)
    assert fast.dtype == dtype and fast.shape == expected.shape
    torch.testing.assert_close(fast, expected, rtol=0, atol=0, equal_nan=True)
    if images.dim() == 4:
        assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last or shape[1] == 1
    finite = images.nan_to_num(0.0, posinf=0.0, neginf=0.0).requires_grad_(True)
    weights = torch.randn(expected.shape, dtype=dtype)
    (gradient,) = torch.autograd.grad((pool(finite) * weights).sum(), finite)
    (expected_gradient,) = torch.autograd.grad((reference(finite) * weights).sum(), finite)
    assert torch.equal(gradient, expected_gradient)


def test_lenet5_compiles_in_one_graph_with_and_without_gradients():
    torch.manual_seed(0)
    model = lenet5().eval()
    compiled = torch.compile(model, fullgraph=True)
    images = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
    inputs = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(compiled(inputs).square().sum(), inputs)
    (expected,) = torch.autograd.grad(model(inputs).square().sum(), inputs)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-5)
