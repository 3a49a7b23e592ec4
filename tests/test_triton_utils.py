"""The shared Triton helpers, under the interpreter without a GPU (compiled on one)."""

# No `from __future__ import annotations`: see dfkd_fast/ops/kd_div_triton.py.
import pytest
import torch

import dfkd_fast
from dfkd_fast.ops._triton import interpreter_problem

from .paths import CUDA_AVAILABLE, INTERPRETER

pytestmark = pytest.mark.skipif(
    not (INTERPRETER or CUDA_AVAILABLE), reason="needs Triton's interpreter or a CUDA device"
)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
round_to_bfloat16 = pytest.importorskip("dfkd_fast.ops.triton_utils").round_to_bfloat16


@triton.jit
def _round_kernel(source, target, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(target + offsets, round_to_bfloat16(tl.load(source + offsets, mask=mask)), mask)


def _rounded_by_kernel(values: torch.Tensor) -> torch.Tensor:
    device = "cuda" if CUDA_AVAILABLE else "cpu"
    source = values.to(device)
    target = torch.empty_like(source)
    _round_kernel[(1,)](source, target, source.numel(), BLOCK=triton.next_power_of_2(source.numel()))
    return target.cpu()


def test_round_to_bfloat16_is_round_to_nearest_even_with_the_low_bits_cleared():
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31, (200,), generator=generator, dtype=torch.int64)
    ties = [0x3F808000, 0x3F818000, 0xBF808000]  # exactly halfway: round to the even neighbour
    near = [0x3F807FFF, 0x3F808001, 0x7F7FFFFF]  # just below / above halfway, the largest finite
    words = torch.cat([bits, torch.tensor(ties + near), -bits[:20] - 1]).to(torch.int32)
    values = words.view(torch.float32)
    values = values[torch.isfinite(values)]
    values = torch.cat([values, torch.tensor([0.0, -0.0, float("inf"), float("-inf")])])
    rounded = _rounded_by_kernel(values)
    expected = values.to(torch.bfloat16).to(torch.float32)  # torch rounds to nearest even
    assert torch.equal(rounded.view(torch.int32), expected.view(torch.int32))
    assert torch.all(rounded.view(torch.int32) & 0xFFFF == 0)


def test_round_to_bfloat16_keeps_nan():
    rounded = _rounded_by_kernel(torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(rounded[0]) and rounded[1] == 1.0


@pytest.mark.parametrize(
    "triton_version, numpy_version, refused",
    [("3.0.0", "2.1.3", True), ("3.1.0", "2.0.0", True), ("3.1.0", "1.26.4", False),
     ("3.2.0", "2.4.6", False), ("3.6.0+git1234", "2.0.0rc1", False), ("4.0.0", "3.0.0", False)],
)  # fmt: skip
def test_interpreter_versions_that_write_nothing_are_named(triton_version, numpy_version, refused):
    problem = interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert triton_version in problem and numpy_version in problem and "numpy<2" in problem


@pytest.mark.skipif(not INTERPRETER, reason="the refusal concerns Triton's interpreter")
def test_an_op_refuses_an_interpreter_that_would_write_nothing(monkeypatch):
    import numpy

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    monkeypatch.setattr(numpy, "__version__", "2.0.0")
    logits = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=r"dfkd_fast.kd_div: Triton 3.1.0's interpreter"):
        dfkd_fast.kd_div(logits, logits.flip(0), 2.0)
    monkeypatch.setattr(numpy, "__version__", "1.26.4")
    assert torch.isfinite(dfkd_fast.kd_div(logits, logits.flip(0), 2.0))
