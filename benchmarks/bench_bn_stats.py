"""BatchNorm-statistic matching (DeepInversion loss), forward + backward to the BN inputs:
dfkd_fast.bn_stat_loss against the eager formulation (torch.var_mean per layer, the two norms,
autograd) and torch.compile of it; and the fused eval BatchNorm + statistics against a plain eval
BatchNorm forward. Run:

    python -m pytest benchmarks/bench_memory.py benchmarks/bench_bn_stats.py \\
        --benchmark-json=out.json
    python benchmarks/report.py out.json --op bn_stat_loss
    python benchmarks/report.py out.json --op teacher_bn_loss
    python benchmarks/report.py out.json --op batchnorm_forward
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dfkd_fast
from dfkd_fast.hooks import batchnorm_layers
from dfkd_fast.models import cifar_resnet, cifar_resnet34
from harness import describe, peak_memory_bytes, timed

LAYER_SHAPES = [(256, 16, 32, 32), (256, 64, 32, 32), (256, 128, 16, 16), (256, 256, 8, 8),
                (256, 512, 4, 4)]  # ResNet-56 stage 1 (16 channels), then ResNet-34 widths
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
TEACHERS = {"resnet34": cifar_resnet34, "resnet56": lambda: cifar_resnet(56)}
BATCH = 256


def eager_bn_stat_loss(x, running_mean, running_var):
    var, mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def fused_bn_stat_loss(x, running_mean, running_var):
    return dfkd_fast.bn_stat_loss(x, running_mean, running_var)


LOSSES = {
    "dfkd_fast": lambda: fused_bn_stat_loss,
    "eager": lambda: eager_bn_stat_loss,
    "torch.compile": lambda: torch.compile(eager_bn_stat_loss, dynamic=False),
}


def _label(shape) -> str:
    return "x".join(str(s) for s in shape)


def _layer_input(shape, dtype, layout, device) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return x.contiguous(memory_format=LAYOUTS[layout])


def _layer_label(shape, layout) -> str:
    return _label(shape) + ("" if layout == "nchw" else f" {layout}")


def _running_stats(channels, device):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(channels, generator=generator).to(device),
            (torch.rand(channels, generator=generator) + 0.5).to(device))  # fmt: skip


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=_label)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("implementation", list(LOSSES))
def test_layer_loss_forward_backward(benchmark, device, implementation, dtype, layout, shape):
    x = _layer_input(shape, dtype, layout, device).requires_grad_()
    running_mean, running_var = _running_stats(shape[1], device)
    function = LOSSES[implementation]()

    def forward_backward():
        x.grad = None
        function(x, running_mean, running_var).backward()

    run = timed(forward_backward, device)
    for _ in range(3):
        run()
    numel = x.numel()
    describe(
        benchmark, device, op="bn_stat_loss", implementation=implementation, numel=numel,
        shape=_layer_label(shape, layout), dtype=_dtype_name(dtype),
        bytes=3 * numel * x.element_size(),  # read x, read it again in backward, write grad_x
        peak_memory=peak_memory_bytes(run, device),
    )  # fmt: skip
    benchmark.pedantic(run, rounds=max(5, min(100, 2**25 // numel)), warmup_rounds=1)


def _teacher_inputs(name: str, device: str):
    """Every BatchNorm layer's input for a batch of 256 through the teacher, and the layers."""
    teacher = TEACHERS[name]().to(device).eval()
    layers = batchnorm_layers(teacher)
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
               for layer in layers]  # fmt: skip
    with torch.no_grad():
        teacher(torch.randn(BATCH, 3, 32, 32, device=device))
    for handle in handles:
        handle.remove()
    return [x.detach().requires_grad_() for x in inputs], layers


@pytest.mark.parametrize("teacher", list(TEACHERS))
@pytest.mark.parametrize("implementation", list(LOSSES))
def test_whole_teacher_loss_forward_backward(benchmark, device, implementation, teacher):
    inputs, layers = _teacher_inputs(teacher, device)
    function = LOSSES[implementation]()

    def forward_backward():
        for x in inputs:
            x.grad = None
        total = sum(function(x, layer.running_mean, layer.running_var)
                    for x, layer in zip(inputs, layers))  # fmt: skip
        total.backward()

    run = timed(forward_backward, device)
    for _ in range(3):
        run()
    numel = sum(x.numel() for x in inputs)
    describe(
        benchmark, device, op="teacher_bn_loss", implementation=implementation, numel=numel,
        shape=f"{teacher} batch {BATCH} ({len(layers)} BN layers)", dtype="float32",
        bytes=3 * numel * 4, peak_memory=peak_memory_bytes(run, device),
    )  # fmt: skip
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def _batchnorm_alone(x, running_mean, running_var, weight, bias):
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, 1e-5)


def _eager_batchnorm_with_matching(x, running_mean, running_var, weight, bias):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, 1e-5)
    return y, eager_bn_stat_loss(x, running_mean, running_var)


def _fused_batchnorm_with_matching(x, running_mean, running_var, weight, bias):
    return dfkd_fast.batch_norm_with_stat_loss(x, running_mean, running_var, weight, bias)[:2]


BATCHNORM_FORWARDS = {
    "dfkd_fast": _fused_batchnorm_with_matching,
    "eager": _eager_batchnorm_with_matching,
    "batchnorm alone": _batchnorm_alone,
}


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=_label)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("implementation", list(BATCHNORM_FORWARDS))
def test_batchnorm_forward_with_matching(benchmark, device, implementation, dtype, layout, shape):
    """An eval BatchNorm forward plus its statistic-matching loss: dfkd_fast reads x once for
    both; eager runs F.batch_norm and then var_mean and the norms. "batchnorm alone" is the
    forward without matching, the lower bound (the GPU target: within 10% of it)."""
    x = _layer_input(shape, dtype, layout, device)
    running_mean, running_var = _running_stats(shape[1], device)
    weight, bias = torch.ones(shape[1], device=device), torch.zeros(shape[1], device=device)
    function = BATCHNORM_FORWARDS[implementation]
    run = timed(lambda: function(x, running_mean, running_var, weight, bias), device)
    for _ in range(3):
        run()
    numel = x.numel()
    describe(
        benchmark, device, op="batchnorm_forward", implementation=implementation, numel=numel,
        shape=_layer_label(shape, layout), dtype=_dtype_name(dtype),
        bytes=2 * numel * x.element_size(),
        peak_memory=peak_memory_bytes(run, device),
    )  # fmt: skip
    benchmark.pedantic(run, rounds=max(5, min(100, 2**25 // numel)), warmup_rounds=1)


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=_label)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("implementation", ["dfkd_fast", "eager"])
def test_batchnorm_with_matching_forward_backward(benchmark, device, implementation, dtype, layout,
                                                  shape):  # fmt: skip
    """What the generator update runs through each of the teacher's BatchNorm layers: the eval
    forward with its matching loss, and the backward of both to x."""
    x = _layer_input(shape, dtype, layout, device).requires_grad_()
    running_mean, running_var = _running_stats(shape[1], device)
    weight, bias = torch.ones(shape[1], device=device), torch.zeros(shape[1], device=device)
    function = BATCHNORM_FORWARDS[implementation]
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def forward_backward():
        x.grad = None
        y, loss = function(x, running_mean, running_var, weight, bias)
        torch.autograd.backward([y, loss], [grad_y, torch.ones_like(loss)])

    run = timed(forward_backward, device)
    for _ in range(3):
        run()
    numel = x.numel()
    describe(
        benchmark, device, op="batchnorm_forward_backward", implementation=implementation,
        numel=numel, shape=_layer_label(shape, layout), dtype=_dtype_name(dtype),
        bytes=5 * numel * x.element_size(),  # forward: read x, write y; backward: x, grad_y, grad_x
        peak_memory=peak_memory_bytes(run, device),
    )  # fmt: skip
    benchmark.pedantic(run, rounds=max(5, min(100, 2**25 // numel)), warmup_rounds=1)
