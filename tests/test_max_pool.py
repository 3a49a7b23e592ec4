"""dfkd_fast.max_pool2x2 and its kernel dfkd_fast::max_pool2x2 against F.max_pool2d, bit for bit:
outputs, which maximum a window's gradient goes to (ties, NaN, infinities), second derivatives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfkd_fast
from dfkd_fast import _extension
from dfkd_fast.models.layers import MaxPool2x2
from dfkd_fast.ops.max_pool import max_pool2x2, max_pool2x2_reference

from .profiling import op_calls

needs_kernel = pytest.mark.skipif(
    not _extension.has_kernel("max_pool2x2", "cpu"), reason=_extension.extension_status()
)

# (N, C, H, W): odd sizes (a last row or column in no window), 2x2, one to six channels
SHAPES = [(3, 3, 28, 28), (2, 1, 5, 4), (2, 6, 7, 9), (1, 4, 2, 2), (4, 5, 3, 11), (2, 2, 16, 3)]


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


KERNEL_DTYPES = [torch.float32, torch.bfloat16]


def activations(shape, seed, kind="relu", dtype=torch.float32):
    """ReLU outputs (many tied zeros), small integers (ties between non-zero values), or normals
    with NaN and infinities sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    if kind == "relu":
        x = torch.randn(shape, generator=g).relu()
    elif kind == "integers":
        x = torch.randint(-2, 3, shape, generator=g).float()
    else:
        x = torch.randn(shape, generator=g)
        special = torch.rand(shape, generator=g)
        x[special < 0.05] = float("nan")
        x[(special >= 0.05) & (special < 0.1)] = float("inf")
        x[(special >= 0.1) & (special < 0.15)] = -float("inf")
    return channels_last(x.to(dtype))


def output_and_gradient(function, x, grad_output=None):
    x = x.detach().requires_grad_()
    output = function(x)
    if grad_output is None:
        g = torch.Generator().manual_seed(1)
        grad_output = torch.randn(output.shape, generator=g).to(output.dtype)
    (grad_x,) = torch.autograd.grad(output, x, grad_output)
    return output, grad_x


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["relu", "integers", "special"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_output_and_gradient_equal_max_pool2d(shape, kind, dtype):
    x = activations(shape, seed=sum(shape), kind=kind, dtype=dtype)
    output, grad_x = output_and_gradient(max_pool2x2, x)
    expected_output, expected_grad = output_and_gradient(max_pool2x2_reference, x)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad_x, expected_grad, rtol=0, atol=0)
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert kernel_calls(lambda: max_pool2x2(x)) == 1


@needs_kernel
def test_the_positions_are_max_pool2d_indices():
    x = activations((2, 3, 9, 8), seed=3, kind="integers")
    output, positions = torch.ops.dfkd_fast.max_pool2x2(x)
    expected, indices = F.max_pool2d_with_indices(x, 2)
    rows, columns = indices // x.shape[3], indices % x.shape[3]
    assert positions.dtype == torch.uint8
    torch.testing.assert_close(positions.long(), (rows % 2) * 2 + columns % 2, rtol=0, atol=0)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


@needs_kernel
def test_the_kernel_reads_views_of_larger_tensors():
    storage = activations((3, 7, 12, 13), seed=5, kind="special")
    x = storage[1:, 2:5, 1:10, 2:12]  # not contiguous in any layout
    output, positions = torch.ops.dfkd_fast.max_pool2x2(x)
    torch.testing.assert_close(output, F.max_pool2d(x, 2), rtol=0, atol=0, equal_nan=True)
    grad_output = torch.randn(output.shape)
    grad_x = torch.ops.dfkd_fast.max_pool2x2_backward(grad_output, positions, list(x.shape))
    reference = x.detach().clone().requires_grad_()
    F.max_pool2d(reference, 2).backward(grad_output)
    torch.testing.assert_close(grad_x, reference.grad, rtol=0, atol=0)


def kernel_calls(function) -> int:
    return op_calls(function, "dfkd_fast::max_pool2x2")


# channel counts with code of their own (1-16), and wider ones looped over as they are
@needs_kernel
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 24, 33])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_every_channel_count_equals_max_pool2d(channels, dtype):
    # 515 windows in a row: more than one block of corners for every channel count up to 16
    for shape in [(1, channels, 5, 1031), (3, channels, 7, 6)]:
        x = activations(shape, seed=channels, kind="special", dtype=dtype)
        x[:, :, 3] = x[:, :, 2]  # ties between rows
        output, positions = torch.ops.dfkd_fast.max_pool2x2(x)
        torch.testing.assert_close(output, F.max_pool2d(x, 2), rtol=0, atol=0, equal_nan=True)
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(channels))
        grad_output = grad_output.to(dtype)
        # freed NaNs, mostly where the gradient is allocated next: a position left unwritten shows
        nan_filled = channels_last(torch.full(x.shape, float("nan"), dtype=dtype))
        del nan_filled
        grad_x = torch.ops.dfkd_fast.max_pool2x2_backward(grad_output, positions, list(x.shape))
        reference = x.detach().clone().requires_grad_()
        F.max_pool2d(reference, 2).backward(grad_output)
        torch.testing.assert_close(grad_x, reference.grad, rtol=0, atol=0)


@needs_kernel
def test_dispatch():
    """The kernel for float32 and bfloat16 channels_last CPU tensors; max_pool2d for another
    layout or dtype, and with the reference backend."""
    for channels in (3, 16, 40):
        x = activations((2, channels, 6, 6), seed=0)
        assert kernel_calls(lambda: max_pool2x2(x)) == 1
        assert kernel_calls(lambda: max_pool2x2(x.bfloat16())) == 1
    x = activations((2, 3, 6, 6), seed=0)
    assert kernel_calls(lambda: max_pool2x2(x.contiguous())) == 0
    assert kernel_calls(lambda: max_pool2x2(x.double())) == 0
    assert kernel_calls(lambda: max_pool2x2(x.half())) == 0
    with dfkd_fast.use_backend("reference"):
        assert kernel_calls(lambda: max_pool2x2(x)) == 0


def max_pool2d_calls(function) -> int:
    return op_calls(function, "aten::max_pool2d")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_without_gradients_the_kernel_or_the_phase_maximum(dtype):
    """Where the kernel does not serve and no gradient is needed, the maximum of the four
    phases, equal to max_pool2d; max_pool2d where a gradient is needed, and with the reference
    backend."""
    x = activations((2, 5, 11, 10), seed=3, kind="special").contiguous().to(dtype)
    expected = F.max_pool2d(x, 2)
    with torch.no_grad():
        assert max_pool2d_calls(lambda: max_pool2x2(x)) == 0
        torch.testing.assert_close(max_pool2x2(x), expected, rtol=0, atol=0, equal_nan=True)
        with dfkd_fast.use_backend("reference"):
            assert max_pool2d_calls(lambda: max_pool2x2(x)) == 1
    assert max_pool2d_calls(lambda: max_pool2x2(x)) == 0
    assert max_pool2d_calls(lambda: max_pool2x2(x.requires_grad_())) == 1
    output, grad_x = output_and_gradient(max_pool2x2, x)
    expected_output, expected_grad = output_and_gradient(max_pool2x2_reference, x)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad_x, expected_grad, rtol=0, atol=0)


@needs_kernel
def test_second_derivatives_equal_max_pool2d():
    x = activations((2, 3, 7, 6), seed=2, kind="integers") + torch.rand(2, 3, 7, 6)

    def second(function):
        x_ = x.detach().clone().requires_grad_()
        grad_output = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(4))
        grad_output.requires_grad_()
        (grad_x,) = torch.autograd.grad(function(x_), x_, grad_output, create_graph=True)
        weight = torch.randn(grad_x.shape, generator=torch.Generator().manual_seed(5))
        return torch.autograd.grad((grad_x * weight).sum(), grad_output)

    torch.testing.assert_close(second(max_pool2x2), second(max_pool2x2_reference), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_opcheck(dtype):
    x = activations((2, 3, 7, 6), seed=1, dtype=dtype).requires_grad_()
    torch.library.opcheck(torch.ops.dfkd_fast.max_pool2x2.default, (x,))
    output, positions = torch.ops.dfkd_fast.max_pool2x2(x.detach())
    grad_output = torch.randn(output.shape, dtype=dtype).requires_grad_()
    torch.library.opcheck(
        torch.ops.dfkd_fast.max_pool2x2_backward.default, (grad_output, positions, list(x.shape))
    )  # fmt: skip


def test_torch_compile_matches_eager():
    x = activations((2, 3, 8, 6), seed=6)
    compiled = torch.compile(max_pool2x2, fullgraph=True)
    eager = output_and_gradient(max_pool2x2, x)
    for actual, expected in zip(output_and_gradient(compiled, x), eager):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    contiguous = x.contiguous()
    with torch.no_grad():
        torch.testing.assert_close(compiled(contiguous), max_pool2x2(contiguous), rtol=0, atol=0)


@pytest.mark.parametrize(
    "x,error,message",
    [
        (torch.randn(2, 3, 4), ValueError, "x must have shape"),
        (torch.randn(2, 3, 1, 4), ValueError, "H, W >= 2"),
        (torch.ones(2, 3, 4, 4, dtype=torch.int64), TypeError, "floating-point"),
        ([[1.0]], TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(x, error, message):
    with pytest.raises(error, match=message):
        max_pool2x2(x)


@needs_kernel
def test_the_kernels_reject_what_they_cannot_compute():
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match="float32 or bfloat16"):
            torch.ops.dfkd_fast.max_pool2x2(torch.randn(2, 3, 4, 4, dtype=dtype))
    with pytest.raises(ValueError, match="H, W >= 2"):
        torch.ops.dfkd_fast.max_pool2x2(torch.randn(2, 3, 1, 4))
    positions = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must have shape"):
        torch.ops.dfkd_fast.max_pool2x2_backward(torch.randn(2, 3, 2, 2), positions, [2, 3, 6, 4])
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.dfkd_fast.max_pool2x2_backward(torch.randn(2, 3, 2, 2), positions.long(),
                                                 [2, 3, 4, 4])  # fmt: skip


def test_the_layer_pools_with_and_without_gradients_as_max_pool2d():
    layer, pytorch = MaxPool2x2(), nn.MaxPool2d(2)
    x = activations((2, 3, 11, 10), seed=7, kind="integers")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), pytorch(x), rtol=0, atol=0)
    for actual, expected in zip(output_and_gradient(layer, x), output_and_gradient(pytorch, x)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
