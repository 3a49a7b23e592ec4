"""dfkd_fast.BNStatHooks on real teachers: the pretrained CIFAR-10 ResNets of ../shared/models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dfkd_fast
from dfkd_fast.hooks import PenultimateFeatures, batchnorm_layers
from dfkd_fast.models import cifar_resnet, load_pretrained_cifar_resnet, small_cnn
from dfkd_fast.ops.bn_stats import bn_stats_reference, statistics_loss_reference

from .paths import path_fixture
from .shared import pretrained_resnet_path
from .tolerances import BN_LOSS, NETWORK, assert_logits_close


path = path_fixture("bn_stat_loss", has_cpu_kernel=True)


def frozen(model: nn.Module, device) -> nn.Module:
    return model.to(device).eval().requires_grad_(False)


def hand_written_reference(teacher, x, layer_weights, momentum=0.0, ema=None):
    """Total loss and input gradient in float64, with a plain forward hook per BatchNorm layer."""
    teacher64 = copy.deepcopy(teacher).cpu().double()
    layers = batchnorm_layers(teacher64)
    losses = [None] * len(layers)

    def make_hook(index):
        def hook(module, inputs, output):
            mean, var = bn_stats_reference(inputs[0])
            ema_mean, ema_var = ema[index] if ema else (None, None)
            losses[index] = statistics_loss_reference(
                mean, var, module.running_mean, module.running_var,
                momentum if ema else 0.0, ema_mean, ema_var,
            )  # fmt: skip

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    x64 = x.detach().cpu().double().requires_grad_()
    logits = teacher64(x64)
    total = sum(w * loss for w, loss in zip(layer_weights, losses))
    (total + 0.01 * logits.sum()).backward()
    for handle in handles:
        handle.remove()
    return total, x64.grad, logits


def weights_for(teacher, first_layer_weight):
    count = len(batchnorm_layers(teacher))
    generator = torch.Generator().manual_seed(5)
    weights = (0.5 + torch.rand(count, generator=generator)).tolist()
    effective = [weights[0] * first_layer_weight, *weights[1:]]
    return weights, effective


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "hooked"])
def test_pretrained_resnet20_loss_and_input_gradient(path, fuse):
    teacher = frozen(load_pretrained_cifar_resnet(pretrained_resnet_path(20)), path.device)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(path.device)
    weights, effective = weights_for(teacher, first_layer_weight=10.0)
    expected_loss, expected_grad, expected_logits = hand_written_reference(teacher, x, effective)

    xk = x.clone().requires_grad_()
    with dfkd_fast.BNStatHooks(teacher, weights, first_layer_weight=10.0, fuse=fuse) as matching:
        logits = teacher(xk)
        loss = matching.loss()
    (loss + 0.01 * logits.sum()).backward()
    assert isinstance(loss, torch.Tensor) and loss.device == x.device
    assert len(matching.layer_losses()) == 19
    BN_LOSS.assert_close(loss, expected_loss)
    assert_logits_close(logits, expected_logits)
    NETWORK.assert_close(xk.grad, expected_grad)


def test_pretrained_resnet56_on_the_default_path():
    teacher = frozen(load_pretrained_cifar_resnet(pretrained_resnet_path(56)), "cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    weights, effective = weights_for(teacher, first_layer_weight=1.0)
    expected_loss, expected_grad, _ = hand_written_reference(teacher, x, effective)
    xk = x.clone().requires_grad_()
    with dfkd_fast.BNStatHooks(teacher, weights) as matching:
        logits = teacher(xk)
        loss = matching.loss()
    (loss + 0.01 * logits.sum()).backward()
    BN_LOSS.assert_close(loss, expected_loss)
    NETWORK.assert_close(xk.grad, expected_grad)


def test_momentum_blends_with_the_ema_of_earlier_batches(path):
    teacher = frozen(cifar_resnet(8), path.device)
    torch.manual_seed(0)
    batches = [torch.randn(3, 3, 16, 16).to(path.device) for _ in range(3)]
    momentum = 0.8
    losses = []
    with dfkd_fast.BNStatHooks(teacher, momentum=momentum) as matching:
        for batch in batches:
            teacher(batch)
            losses.append(matching.loss())
            matching.update_ema()
    ema = None
    weights = [1.0] * len(batchnorm_layers(teacher))
    for batch, loss in zip(batches, losses):
        expected, _, _ = hand_written_reference(teacher, batch, weights, momentum, ema)
        BN_LOSS.assert_close(loss, expected)
        stats = [bn_stats_reference(s) for s in _layer_inputs(teacher, batch)]
        ema = stats if ema is None else [
            (momentum * m + (1 - momentum) * bm, momentum * v + (1 - momentum) * bv)
            for (m, v), (bm, bv) in zip(ema, stats)
        ]  # fmt: skip


def _layer_inputs(teacher, x):
    inputs = []
    handles = [layer.register_forward_hook(lambda m, i, o: inputs.append(i[0].double().cpu()))
               for layer in batchnorm_layers(teacher)]  # fmt: skip
    with torch.no_grad():
        teacher(x)
    for handle in handles:
        handle.remove()
    return inputs


def test_a_teacher_in_train_mode_is_matched_through_hooks(path):
    teacher = cifar_resnet(8).to(path.device).train().requires_grad_(False)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(path.device)
    inputs = _layer_inputs(copy.deepcopy(teacher), x)
    layers = batchnorm_layers(teacher)
    expected = sum(
        statistics_loss_reference(*bn_stats_reference(i), l.running_mean.double().cpu(),
                                  l.running_var.double().cpu())
        for i, l in zip(inputs, layers)
    )  # fmt: skip
    with dfkd_fast.BNStatHooks(teacher) as matching:
        assert not matching._fused  # train-mode layers keep their own forward
        teacher(x)
        loss = matching.loss()
    BN_LOSS.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------
# The block
# ------------------------------------------------------------------------------------------


def test_everything_is_restored_after_the_block_and_after_an_exception(path):
    teacher = frozen(cifar_resnet(8), path.device)
    x = torch.randn(2, 3, 8, 8).to(path.device)
    before = teacher(x)
    with dfkd_fast.BNStatHooks(teacher) as matching:
        teacher(x)
        matching.loss()
    with pytest.raises(KeyError):
        with dfkd_fast.BNStatHooks(teacher, fuse=False):
            raise KeyError("boom")
    with pytest.raises(KeyError):
        with dfkd_fast.BNStatHooks(teacher, fuse=True):
            raise KeyError("boom")
    for layer in batchnorm_layers(teacher):
        assert "forward" not in vars(layer) and not layer._forward_hooks
    assert torch.equal(teacher(x), before)


def test_fused_teacher_gives_the_teachers_logits(path):
    teacher = frozen(cifar_resnet(14), path.device)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)).to(path.device)
    with torch.no_grad():
        plain = teacher(x)
        with dfkd_fast.BNStatHooks(teacher):
            fused = teacher(x)
    NETWORK.assert_close(fused, plain)


def test_a_teacher_without_batchnorm_is_an_error():
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        dfkd_fast.BNStatHooks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        dfkd_fast.BNStatHooks(lambda x: x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layer_weights=[1.0, 2.0]), "one weight per BatchNorm layer"),
        (dict(layer_weights=[-1.0] * 3), "finite and >= 0"),
        (dict(first_layer_weight=float("nan")), "finite and >= 0"),
        (dict(momentum=1.5), "momentum"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dfkd_fast.BNStatHooks(small_cnn(4), **kwargs)


def test_loss_before_the_teacher_ran_is_an_error():
    with dfkd_fast.BNStatHooks(small_cnn(4)) as matching:
        with pytest.raises(RuntimeError, match="call the teacher"):
            matching.loss()


def test_layers_that_did_not_run_are_reported():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.BatchNorm2d(3)
            self.unused = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.used(x)

    model = TwoBranches().eval()
    with dfkd_fast.BNStatHooks(model) as matching:
        model(torch.randn(2, 3, 4, 4))
        with pytest.warns(RuntimeWarning, match="only 1 of 2 BatchNorm layers ran"):
            matching.loss()


def test_penultimate_features_are_the_last_linear_input_and_the_hook_is_removed():
    torch.manual_seed(0)
    classifier = small_cnn(4).eval()
    images = torch.randn(5, 1, 8, 8)
    last_linear = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
    expected = {}
    handle = last_linear.register_forward_pre_hook(lambda m, inputs: expected.update(x=inputs[0]))
    logits = classifier(images)
    handle.remove()
    with PenultimateFeatures(classifier) as features:
        assert torch.equal(classifier(images), logits)
    assert torch.equal(features.value, expected["x"])
    assert not last_linear._forward_pre_hooks
    with pytest.raises(ValueError, match="no nn.Linear"):
        PenultimateFeatures(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(TypeError, match="classifier must be an nn.Module"):
        PenultimateFeatures("lenet5")
