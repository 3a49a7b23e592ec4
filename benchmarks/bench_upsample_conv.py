"""The generator's and the VAE decoder's upsample-conv layers, forward + backward (gradients of
the input, the weight and the bias): dfkd_fast.upsample_conv2d (2x2 kernels on the input, then
interleaving) against eager PyTorch, interpolate(x, scale_factor=2) then conv2d with padding 1,
and torch.compile of that expression. Shapes are the presets' (batch 256, channels_last, as the
presets run them). And the interleaving of those layers' parity maps alone, forward + backward:
the dfkd_fast::interleave_parities operator (the extension's kernels on the CPU) against
PyTorch's strided copy of the same views, eager and compiled, in both memory formats. Run:

    python -m pytest benchmarks/bench_memory.py benchmarks/bench_upsample_conv.py \
        --benchmark-json=out.json
    python benchmarks/report.py out.json --op upsample_conv2d
"""

from __future__ import annotations

import pytest
import torch

from dfkd_fast.ops.upsample_conv import (
    deinterleave_by_copy,
    interleave_by_copy,
    upsample_conv2d,
    upsample_conv2d_reference,
)
from harness import describe, peak_memory_bytes, timed

# (name, batch, in_channels, height = width before upsampling, out_channels)
SHAPES = [
    ("mnist generator 1", 256, 32, 8, 32),
    ("mnist generator 2", 256, 32, 16, 16),
    ("mnist VAE decoder 2", 256, 32, 16, 1),
    ("cifar10 generator 1", 256, 128, 8, 128),
    ("cifar10 generator 2", 256, 128, 16, 64),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

IMPLEMENTATIONS = {
    "dfkd_fast": lambda: upsample_conv2d,
    "eager": lambda: upsample_conv2d_reference,
    "torch.compile": lambda: torch.compile(upsample_conv2d_reference, dynamic=False),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0].replace(" ", "-"))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_upsample_conv2d_forward_backward(benchmark, device, implementation, dtype, shape):
    name, batch, in_channels, size, out_channels = shape
    if device == "cpu" and dtype == "bfloat16" and "cifar10" in name:
        pytest.skip("minutes per case on a CPU without bfloat16 instructions")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator) / in_channels
    bias = torch.randn(out_channels, generator=generator)
    x, weight, bias = (t.to(device, DTYPES[dtype]) for t in (x, weight, bias))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    bias.requires_grad_()
    grad_output = torch.randn(batch, out_channels, 2 * size, 2 * size, generator=generator)
    grad_output = grad_output.to(device, DTYPES[dtype])
    grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    function = IMPLEMENTATIONS[implementation]()

    def forward_backward():
        x.grad = weight.grad = bias.grad = None
        function(x, weight, bias).backward(grad_output)

    run = timed(forward_backward, device)
    for _ in range(3):  # compile and warm up outside the timed rounds
        run()
    element_bytes = x.element_size()
    output_numel = grad_output.numel()
    describe(
        benchmark,
        device,
        op="upsample_conv2d",
        implementation=implementation,
        numel=output_numel,
        shape=f"{name}: {batch}x{in_channels}x{size}x{size} -> {out_channels}",
        dtype=dtype,
        # forward reads x and writes the output; backward reads the output's gradient and x and
        # writes x's gradient
        bytes=(3 * x.numel() + 2 * output_numel) * element_bytes,
        # the eager computation's multiply-adds, forward and the two backward convolutions
        flops=2 * 3 * output_numel * in_channels * 9,
        peak_memory=peak_memory_bytes(run, device),
    )
    rounds = 5 if device == "cpu" and "cifar10" in name else 20
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


def interleave_by_ops(maps, grad_output):
    return (torch.ops.dfkd_fast.interleave_parities(maps),
            torch.ops.dfkd_fast.interleave_parities_backward(grad_output))  # fmt: skip


def interleave_by_copies(maps, grad_output):
    return interleave_by_copy(maps), deinterleave_by_copy(grad_output)


INTERLEAVINGS = {
    "dfkd_fast": lambda: interleave_by_ops,
    "eager": lambda: interleave_by_copies,
    "torch.compile": lambda: torch.compile(interleave_by_copies, dynamic=False),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0].replace(" ", "-"))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("implementation", list(INTERLEAVINGS))
def test_interleave_parities_forward_backward(benchmark, device, implementation, layout, dtype,
                                              shape):  # fmt: skip
    """The interleaving of a layer's parity maps and the gathering of their gradient, which is
    all the data movement of upsample_conv2d beyond its convolution."""
    name, batch, _, size, out_channels = shape
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(batch, 4 * out_channels, size + 1, size + 1, generator=generator)
    grad_output = torch.randn(batch, out_channels, 2 * size, 2 * size, generator=generator)
    maps, grad_output = (t.to(device, DTYPES[dtype]).contiguous(memory_format=memory_format)
                         for t in (maps, grad_output))  # fmt: skip
    function = INTERLEAVINGS[implementation]()
    run = timed(lambda: function(maps, grad_output), device)
    for _ in range(3):  # compile and warm up outside the timed rounds
        run()
    describe(
        benchmark,
        device,
        op="interleave_parities",
        implementation=implementation,
        numel=grad_output.numel(),
        shape=f"{name}: {batch}x{4 * out_channels}x{size + 1}x{size + 1} maps, {layout}",
        dtype=dtype,
        # each direction reads and writes the maps once and the output once
        bytes=2 * (maps.numel() + grad_output.numel()) * maps.element_size(),
    )
    benchmark.pedantic(run, rounds=20, warmup_rounds=1)
