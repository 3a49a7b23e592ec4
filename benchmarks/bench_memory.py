"""The device's memory bandwidth, measured in the same run as the ops it is compared with: a
float32 copy of 256 MiB (read + write). benchmarks/report.py divides each op's GB/s by it."""

from __future__ import annotations

import pytest
import torch

from harness import describe, timed


@pytest.mark.parametrize("numel", [2**26])
def test_copy_bandwidth(benchmark, device, numel):
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    run = timed(lambda: target.copy_(source), device)
    run()
    describe(benchmark, device, op="copy", implementation="copy", numel=numel, dtype="float32",
             bytes=2 * numel * 4)
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
