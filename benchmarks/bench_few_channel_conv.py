"""The presets' convolutions with few output or input channels, forward + backward as they run in
a step: dfkd_fast.few_channel_conv2d against eager PyTorch (conv2d) and torch.compile of it.
Shapes are the presets' (batch 256, channels_last, float32). Which gradients a case takes is the
step's: the generator's last layer needs all three, LeNet-5's first layer in the teacher only the
input's (its weights are frozen; the generator learns through it), and none when the teacher
labels the student's batches; the student's first layer needs its weight's and bias's when it
learns. Run:

    python -m pytest benchmarks/bench_memory.py benchmarks/bench_few_channel_conv.py \
        --benchmark-json=out.json
    python benchmarks/report.py out.json --op few_channel_conv2d
"""

from __future__ import annotations

import pytest
import torch

from dfkd_fast.ops.few_channel_conv import few_channel_conv2d, few_channel_conv2d_reference
from harness import describe, peak_memory_bytes, timed

# (name, batch, in_channels, size, out_channels, kernel, padding, gradients of (x, weight, bias))
SHAPES = [
    ("mnist generator last", 256, 16, 32, 1, 3, 1, (True, True, True)),
    ("mnist teacher first", 256, 1, 32, 6, 5, 0, (True, False, False)),
    ("mnist student first", 256, 1, 32, 3, 5, 0, (True, False, False)),
    ("mnist teacher first, forward only", 256, 1, 32, 6, 5, 0, (False, False, False)),
    ("mnist student first, learning", 256, 1, 32, 3, 5, 0, (False, True, True)),
    ("cifar10 generator last", 256, 64, 32, 3, 3, 1, (True, True, True)),
    ("cifar10 teacher first", 256, 3, 32, 16, 3, 1, (True, False, False)),
]

IMPLEMENTATIONS = {
    "dfkd_fast": lambda: few_channel_conv2d,
    "eager": lambda: few_channel_conv2d_reference,
    "torch.compile": lambda: torch.compile(few_channel_conv2d_reference, dynamic=False),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0].replace(" ", "-"))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_few_channel_conv2d_forward_backward(benchmark, device, implementation, shape):
    name, batch, in_channels, size, out_channels, kernel, padding, needs = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator)
    bias = torch.randn(out_channels, generator=generator)
    x, weight = (t.to(device).contiguous(memory_format=torch.channels_last) for t in (x, weight))
    bias = bias.to(device)
    for tensor, need in zip((x, weight, bias), needs):
        tensor.requires_grad_(need)
    out_size = size + 2 * padding - kernel + 1
    grad_output = torch.randn(batch, out_channels, out_size, out_size, generator=generator)
    grad_output = grad_output.to(device).contiguous(memory_format=torch.channels_last)
    function = IMPLEMENTATIONS[implementation]()

    def forward_backward():
        x.grad = weight.grad = bias.grad = None
        output = function(x, weight, bias, padding)
        if any(needs):
            output.backward(grad_output)

    run = timed(forward_backward, device)
    for _ in range(3):  # compile and warm up outside the timed rounds
        run()
    output_numel = grad_output.numel()
    # forward reads x and writes the output; backward reads the output's gradient (and x for the
    # weight's) and writes x's gradient
    tensors_moved = x.numel() + output_numel
    if any(needs):
        tensors_moved += x.numel() + output_numel + (x.numel() if needs[1] else 0)
    describe(
        benchmark,
        device,
        op="few_channel_conv2d",
        implementation=implementation,
        numel=output_numel,
        shape=f"{name}: {batch}x{in_channels}x{size}x{size} -> {out_channels}, {kernel}x{kernel}",
        dtype="float32",
        bytes=tensors_moved * x.element_size(),
        # multiply-adds of the forward and of each gradient convolution taken
        flops=2 * (1 + sum(needs[:2])) * output_numel * in_channels * kernel * kernel,
        peak_memory=peak_memory_bytes(run, device),
    )
    benchmark.pedantic(run, rounds=20, warmup_rounds=1)
