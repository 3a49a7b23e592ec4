"""The shared Triton helpers, under the interpreter without a GPU (compiled on one)."""

# No `from __future__ import annotations`: see dfkd_fast/ops/kd_div_triton.py.
import pytest
import torch

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
