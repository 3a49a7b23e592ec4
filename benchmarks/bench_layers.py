"""CPU-side layers of the training step against the plain PyTorch they replace: LeNet-5's 2x2
max-pool without gradients (``MaxPool2x2``: the frozen teacher's pooling and evaluation) and with
them (its ``max_pool2x2`` kernel, float32 and bfloat16, forward + backward) against
``nn.MaxPool2d(2)``, eager and (with gradients) compiled; and ``random_translate`` (one flat
gather) against the 4-d advanced indexing it replaced. Both give the same values bit for bit
(tests/test_models.py, tests/test_unlabeled.py). Run:

    python -m pytest benchmarks/bench_layers.py --benchmark-json=out.json
    python benchmarks/report.py out.json --op max_pool_2x2
    python benchmarks/report.py out.json --op max_pool_2x2_forward_backward
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfkd_fast.models.layers import MaxPool2x2
from dfkd_fast.training import random_translate
from harness import describe

# LeNet-5's two pooling inputs (teacher, then student widths) at the mnist preset's batch of 256
POOL_SHAPES = [(256, 6, 28, 28), (256, 3, 28, 28), (256, 16, 10, 10)]
TRANSLATE_SHAPES = [(256, 1, 32, 32), (256, 3, 32, 32)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def indexed_translate(images, max_shift, generator):
    """random_translate as it was: 4-d advanced indexing of the padded batch."""
    n, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (shifts[:, 0].view(n, 1) + torch.arange(height)).view(n, 1, height, 1)
    cols = (shifts[:, 1].view(n, 1) + torch.arange(width)).view(n, 1, 1, width)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def skip_unless_cpu(device: str) -> None:
    if device != "cpu":
        pytest.skip("CPU layers: on CUDA MaxPool2x2 is max_pool2d")


def _images(shape, dtype):
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).relu()
    return images.to(DTYPES[dtype]).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("implementation", ["eager", "dfkd_fast"])
def test_max_pool_2x2(benchmark, device, implementation, dtype, shape):
    skip_unless_cpu(device)
    images = _images(shape, dtype)
    pool = MaxPool2x2() if implementation == "dfkd_fast" else torch.nn.MaxPool2d(2)

    def forward():
        with torch.no_grad():
            return pool(images)

    benchmark.pedantic(forward, rounds=30, iterations=1, warmup_rounds=3)
    moved = images.numel() * images.element_size() * 5 // 4  # read all, write a quarter
    describe(benchmark, "cpu", op="max_pool_2x2", implementation=implementation, dtype=dtype,
             shape="x".join(map(str, shape)) + " channels_last", numel=images.numel(),
             bytes=moved)  # fmt: skip


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("implementation", ["eager", "torch.compile", "dfkd_fast"])
def test_max_pool_2x2_forward_backward(benchmark, device, implementation, dtype, shape):
    skip_unless_cpu(device)
    images = _images(shape, dtype).requires_grad_()
    pools = {"dfkd_fast": MaxPool2x2, "eager": lambda: torch.nn.MaxPool2d(2),
             "torch.compile": lambda: torch.compile(torch.nn.MaxPool2d(2), dynamic=False)}
    pool = pools[implementation]()
    grad_output = torch.randn(pool(images).shape, generator=torch.Generator().manual_seed(1))
    grad_output = grad_output.to(DTYPES[dtype]).contiguous(memory_format=torch.channels_last)

    def forward_backward():
        images.grad = None
        pool(images).backward(grad_output)

    benchmark.pedantic(forward_backward, rounds=30, iterations=1, warmup_rounds=3)
    # forward reads all and writes a quarter; backward reads a quarter and writes all
    moved = images.numel() * images.element_size() * 5 // 2
    describe(benchmark, "cpu", op="max_pool_2x2_forward_backward", implementation=implementation,
             dtype=dtype, shape="x".join(map(str, shape)) + " channels_last",
             numel=images.numel(), bytes=moved)  # fmt: skip


@pytest.mark.parametrize("shape", TRANSLATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("implementation", ["eager", "dfkd_fast"])
def test_random_translate(benchmark, device, implementation, dtype, shape):
    skip_unless_cpu(device)
    images = _images(shape, dtype)
    translate = random_translate if implementation == "dfkd_fast" else indexed_translate
    generator = torch.Generator().manual_seed(0)
    benchmark.pedantic(lambda: translate(images, 2, generator), rounds=30, iterations=1,
                       warmup_rounds=3)  # fmt: skip
    describe(benchmark, "cpu", op="random_translate", implementation=implementation, dtype=dtype,
             shape="x".join(map(str, shape)) + ", shift 2", numel=images.numel(),
             bytes=2 * images.numel() * images.element_size())  # fmt: skip
