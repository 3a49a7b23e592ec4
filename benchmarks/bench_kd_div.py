"""Distillation loss, forward + backward (both logits' gradients): dfkd_fast.kd_div against eager
PyTorch, F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True) * T^2 with
autograd, and torch.compile of that expression. Run:

    python -m pytest benchmarks/bench_memory.py benchmarks/bench_kd_div.py \
        --benchmark-json=out.json
    python benchmarks/report.py out.json --op kd_div
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dfkd_fast
from harness import describe, peak_memory_bytes, timed

TEMPERATURE = 4.0
# (rows, classes): the DFKD shapes, then two large-vocabulary shapes.
SHAPES = [(256, 10), (256, 100), (256, 1000), (4096, 32000), (8192, 131072)]
# The CPU has 24 GB: eager autograd at (8192, 131072) needs several copies of 4 GB logits.
CPU_MAX_ELEMENTS = 4096 * 32000


def eager_kd_div(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (
        F.kl_div(
            F.log_softmax(student / TEMPERATURE, dim=-1),
            F.log_softmax(teacher / TEMPERATURE, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * TEMPERATURE**2
    )


def fused_kd_div(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return dfkd_fast.kd_div(student, teacher, TEMPERATURE)


IMPLEMENTATIONS = {
    "dfkd_fast": lambda: fused_kd_div,
    "eager": lambda: eager_kd_div,
    "torch.compile": lambda: torch.compile(eager_kd_div, dynamic=False),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch.")
)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_kd_div_forward_backward(benchmark, device, implementation, dtype, shape):
    rows, classes = shape
    if device == "cpu" and rows * classes > CPU_MAX_ELEMENTS:
        pytest.skip("too large for the CPU machine's memory")
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(shape, generator=generator)).to(device, dtype).requires_grad_()
    teacher = (3 * torch.randn(shape, generator=generator)).to(device, dtype).requires_grad_()
    function = IMPLEMENTATIONS[implementation]()

    def forward_backward():
        student.grad = teacher.grad = None
        function(student, teacher).backward()

    run = timed(forward_backward, device)
    for _ in range(3):  # compile and warm up outside the timed rounds
        run()
    element_bytes = student.element_size()
    describe(
        benchmark,
        device,
        op="kd_div",
        implementation=implementation,
        numel=rows * classes,
        shape=f"{rows}x{classes}",
        dtype=str(dtype).removeprefix("torch."),
        # forward reads both logits; backward reads them again and writes both gradients
        bytes=6 * rows * classes * element_bytes,
        peak_memory=peak_memory_bytes(run, device),
    )
    benchmark.pedantic(run, rounds=max(5, min(200, 2**24 // (rows * classes))), warmup_rounds=1)
