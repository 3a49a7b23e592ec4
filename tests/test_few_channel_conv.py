"""dfkd_fast.few_channel_conv2d and its kernel dfkd_fast::narrow_conv2d against conv2d in float64,
gradients included, and the layer built on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfkd_fast
from dfkd_fast import _extension
from dfkd_fast.models import Generator, lenet5, lenet5_half
from dfkd_fast.nn import FewChannelConv2d
from dfkd_fast.ops.few_channel_conv import (
    NARROW_CHANNELS,
    few_channel_conv2d,
    few_channel_conv2d_reference,
)

from .gradients import output_and_gradients
from .profiling import op_calls
from .tolerances import assert_as_accurate_as_pytorch

needs_kernel = pytest.mark.skipif(
    not _extension.has_kernel("narrow_conv2d", "cpu"), reason=_extension.extension_status()
)

# (N, C, H, W, O, (KH, KW), padding): one to three channels out (the kernel's forward) or in (its
# input gradient), one channel in (both), odd and non-square sizes, 1 x 1 images, padding beyond
# the kernel, and a wide layer that neither serves
SHAPES = [
    (3, 16, 9, 7, 1, (3, 3), 1),
    (2, 6, 11, 10, 1, (5, 5), 4),
    (2, 5, 6, 9, 3, (3, 2), (2, 0)),
    (4, 1, 12, 12, 6, (5, 5), 0),
    (2, 3, 8, 8, 16, (3, 3), 1),
    (2, 9, 1, 1, 2, (1, 1), 0),
    (1, 4, 3, 5, 2, (3, 3), 3),
    (2, 8, 5, 5, 8, (3, 3), 1),
]


def make_inputs(shape, dtype, channels_last, seed=0):
    n, channels, height, width, out_channels, kernel, _ = shape
    g = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, channels, height, width, generator=g)
    weight = torch.randn(out_channels, channels, *kernel, generator=g) / (channels * 3) ** 0.5
    bias = torch.randn(out_channels, generator=g).to(dtype)
    x, weight = (t.to(dtype).contiguous(memory_format=memory_format) for t in (x, weight))
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_output_and_gradients_match_float64(shape, dtype, channels_last, with_bias):
    x, weight, bias = make_inputs(shape, dtype, channels_last)
    bias = bias if with_bias else None
    padding = shape[-1]
    actual = output_and_gradients(few_channel_conv2d, x, weight, bias, padding)
    pytorch = output_and_gradients(few_channel_conv2d_reference, x, weight, bias, padding)
    exact = output_and_gradients(
        few_channel_conv2d_reference, x.double(), weight.double(),
        None if bias is None else bias.double(), padding,
    )  # fmt: skip
    assert actual[0].dtype == dtype and actual[0].shape == exact[0].shape
    assert actual[0].stride() == pytorch[0].stride()
    for mine, theirs, expected in zip(actual, pytorch, exact):
        assert_as_accurate_as_pytorch(mine, theirs, expected, dtype)


def kernel_calls(function) -> int:
    return op_calls(function, "dfkd_fast::narrow_conv2d")


@needs_kernel
def test_the_kernel_computes_what_it_serves():
    """Forward of a layer to one channel; forward and input gradient of a layer from one channel
    (a 5x5 kernel to six channels: the kernel rows of its gradient hold 5 * 6 values); the
    input gradient of a layer to one channel from up to ONE_CHANNEL_MAX_OUTPUTS; neither for a
    wide layer, a contiguous multi-channel input or another dtype."""
    to_one = make_inputs((2, 16, 9, 7, 1, (3, 3), 1), torch.float32, True)
    assert kernel_calls(lambda: few_channel_conv2d(*to_one, 1)) == 1
    x, weight, bias = make_inputs((2, 1, 12, 12, 6, (5, 5), 0), torch.float32, True)
    x.requires_grad_()
    assert kernel_calls(lambda: few_channel_conv2d(x, weight, bias)) == 1
    output = few_channel_conv2d(x, weight, bias)
    assert kernel_calls(lambda: output.sum().backward()) == 1
    for in_channels, calls in ((6, 1), (16, 0)):  # the flipped kernel: 1 to 6, or 1 to 16
        x, weight, bias = make_inputs((2, in_channels, 9, 7, 1, (3, 3), 1), torch.float32, True)
        output = few_channel_conv2d(x.requires_grad_(), weight, bias, 1)
        assert kernel_calls(lambda: output.sum().backward()) == calls
    wide = make_inputs((2, 8, 5, 5, 8, (3, 3), 1), torch.float32, True)
    assert kernel_calls(lambda: few_channel_conv2d(*wide, 1)) == 0
    contiguous = make_inputs((2, 16, 9, 7, 1, (3, 3), 1), torch.float32, False)
    assert kernel_calls(lambda: few_channel_conv2d(*contiguous, 1)) == 0
    double = make_inputs((2, 16, 9, 7, 1, (3, 3), 1), torch.float64, True)
    assert kernel_calls(lambda: few_channel_conv2d(*double, 1)) == 0


@needs_kernel
@pytest.mark.parametrize("seed", range(6))
def test_the_kernel_on_random_shapes_and_views(seed):
    """Any number of output channels (blocks of up to four), kernel rows with and without a
    scalar tail, padding up to and past the kernel, and inputs that are views of larger
    tensors."""
    g = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=g))

    n, channels, out_channels = draw(1, 3), draw(1, 17), draw(1, 9)
    kernel = (draw(1, 5), draw(1, 5))
    padding = [draw(0, kernel[0] + 1), draw(0, kernel[1] + 1)]
    height = max(1, kernel[0] - 2 * padding[0]) + draw(0, 9)
    width = max(1, kernel[1] - 2 * padding[1]) + draw(0, 9)
    storage = torch.randn(n + 1, channels + 2, height + 3, width + 2, generator=g)
    x = storage.contiguous(memory_format=torch.channels_last)[1:, 1:-1, 2:-1, 1:-1]
    weight = torch.randn(out_channels, channels, *kernel, generator=g)
    bias = torch.randn(out_channels, generator=g)
    actual = torch.ops.dfkd_fast.narrow_conv2d(x, weight, bias, padding)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=padding)
    pytorch = F.conv2d(x, weight, bias, padding=padding)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_as_accurate_as_pytorch(actual, pytorch, exact, torch.float32)


@needs_kernel
@pytest.mark.parametrize("seed", range(8))
def test_the_kernel_on_one_input_channel(seed):
    """One input channel: any number of output channels (blocks of up to six), rows of output
    pixels shorter and longer than a block of 16, padding up to and past the kernel, views."""
    g = torch.Generator().manual_seed(100 + seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=g))

    n, out_channels = draw(1, 3), draw(1, 20)
    kernel = (draw(1, 6), draw(1, 6))
    padding = [draw(0, kernel[0] + 1), draw(0, kernel[1] + 1)]
    height = max(1, kernel[0] - 2 * padding[0]) + draw(0, 9)
    width = max(1, kernel[1] - 2 * padding[1]) + draw(0, 40)
    storage = torch.randn(n + 1, 1, height + 3, width + 2, generator=g) * 100
    views = {torch.contiguous_format: storage[1:, :, 2:-1, 1:-1],
             torch.channels_last: torch.empty_strided(
                 (n, 1, height, width), (height * width, 1, width, 1)
             ).copy_(storage[1:, :, 2:-1, 1:-1])}  # fmt: skip
    weight = torch.randn(out_channels, 1, *kernel, generator=g)
    bias = torch.randn(out_channels, generator=g)
    for memory_format, x in views.items():  # the output's layout is conv2d's: x's strides pick
        actual = torch.ops.dfkd_fast.narrow_conv2d(x, weight, bias, padding)
        exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=padding)
        pytorch = F.conv2d(x, weight, bias, padding=padding)
        assert actual.is_contiguous(memory_format=memory_format)
        assert_as_accurate_as_pytorch(actual, pytorch, exact, torch.float32)


@needs_kernel
def test_large_and_tiny_values_lose_no_more_than_pytorch():
    x, weight, bias = make_inputs((2, 16, 9, 7, 1, (3, 3), 1), torch.float32, True)
    for scale in (1e-30, 1e30):
        actual = few_channel_conv2d(x * scale, weight, bias * scale, 1)
        pytorch = F.conv2d(x * scale, weight, bias * scale, padding=1)
        exact = F.conv2d((x * scale).double(), weight.double(), (bias * scale).double(),
                         padding=1)  # fmt: skip
        assert torch.isfinite(actual).all()
        assert_as_accurate_as_pytorch(actual, pytorch, exact, torch.float32)


@needs_kernel
@pytest.mark.parametrize("shape", [(4, 16, 17, 13, 1, (3, 3), 1), (16, 1, 32, 32, 6, (5, 5), 0)],
                         ids=["to-one-channel", "from-one-channel"])  # fmt: skip
def test_the_result_does_not_depend_on_the_thread_count(shape):
    x, weight, bias = make_inputs(shape, torch.float32, True)
    padding = [shape[-1]] * 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.dfkd_fast.narrow_conv2d(x, weight, bias, padding)
        torch.set_num_threads(max(2, threads))
        several = torch.ops.dfkd_fast.narrow_conv2d(x, weight, bias, padding)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, several, rtol=0, atol=0)


def test_second_derivatives_match_float64():
    x, weight, bias = make_inputs((2, 3, 7, 6, 1, (3, 3), 1), torch.float32, True)

    def gradient_norm(function, x, weight, bias):
        x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
        output = function(x, weight, bias, 1)
        (grad_x,) = torch.autograd.grad(output.square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), (x, weight))

    actual = gradient_norm(few_channel_conv2d, x, weight, bias)
    pytorch = gradient_norm(few_channel_conv2d_reference, x, weight, bias)
    exact = gradient_norm(few_channel_conv2d_reference, x.double(), weight.double(),
                          bias.double())  # fmt: skip
    for mine, theirs, expected in zip(actual, pytorch, exact):
        assert_as_accurate_as_pytorch(mine, theirs, expected, torch.float32)


def test_dispatch_reference_on_request():
    x, weight, bias = make_inputs((2, 16, 9, 7, 1, (3, 3), 1), torch.float32, True)
    with dfkd_fast.use_backend("reference"):
        assert kernel_calls(lambda: few_channel_conv2d(x, weight, bias, 1)) == 0
        torch.testing.assert_close(
            few_channel_conv2d(x, weight, bias, 1), F.conv2d(x, weight, bias, padding=1),
            rtol=0, atol=0,
        )  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[2]], ids=str)
def test_opcheck(channels_last, shape):
    x, weight, bias = make_inputs(shape, torch.float32, channels_last)
    padding = shape[-1]
    padding = list(padding) if isinstance(padding, tuple) else [padding, padding]
    arguments = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), padding)
    torch.library.opcheck(torch.ops.dfkd_fast.few_channel_conv2d.default, arguments)
    if _extension.has_kernel("narrow_conv2d", "cpu") and shape[4] <= NARROW_CHANNELS:
        torch.library.opcheck(
            torch.ops.dfkd_fast.narrow_conv2d.default,
            (x.detach(), weight.detach(), bias.detach(), padding),
            test_utils=("test_schema", "test_faketensor"),
        )  # fmt: skip


def test_torch_compile_matches_eager():
    x, weight, bias = make_inputs((2, 16, 9, 7, 1, (3, 3), 1), torch.float32, True)
    compiled = torch.compile(few_channel_conv2d, fullgraph=True)
    eager = output_and_gradients(few_channel_conv2d, x, weight, bias, 1)
    compiled_results = output_and_gradients(compiled, x, weight, bias, 1)
    for actual, expected in zip(compiled_results, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_convolution_in_bfloat16_like_conv2d():
    x, weight, bias = make_inputs((2, 16, 9, 7, 1, (3, 3), 1), torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = few_channel_conv2d(x, weight, bias, 1)
        pytorch = F.conv2d(x, weight, bias, padding=1)
        mixed = few_channel_conv2d(x.bfloat16(), weight, bias, 1)  # a bfloat16 layer's output
    assert actual.dtype == pytorch.dtype == mixed.dtype == torch.bfloat16
    torch.testing.assert_close(actual, pytorch, rtol=0, atol=0)
    torch.testing.assert_close(mixed, pytorch, rtol=0, atol=0)


@pytest.mark.parametrize(
    "arguments,error,message",
    [
        ((torch.randn(2, 3, 4), torch.randn(1, 3, 3, 3)), ValueError, "x must have"),
        ((torch.randn(2, 3, 4, 4), torch.randn(1, 4, 3, 3)), ValueError, "weight must have"),
        ((torch.randn(2, 3, 4, 4), torch.randn(0, 3, 3, 3)), ValueError, "weight must have"),
        ((torch.randn(2, 3, 4, 4), torch.randn(1, 3, 3, 3), torch.randn(2)), ValueError, "bias"),
        ((torch.randn(2, 3, 4, 4), torch.randn(1, 3, 3, 3).double()), TypeError, "weight must"),
        ((torch.ones(2, 3, 4, 4, dtype=torch.int64), torch.randn(1, 3, 3, 3)), TypeError, "x must"),
        (([[1.0]], torch.randn(1, 3, 3, 3)), TypeError, "x must be a torch.Tensor"),
        ((torch.randn(2, 3, 2, 2), torch.randn(1, 3, 5, 5)), ValueError, "smaller than the kernel"),
        ((torch.randn(2, 3, 4, 4), torch.randn(1, 3, 3, 3), None, -1), ValueError, "padding"),
        ((torch.randn(2, 3, 4, 4), torch.randn(1, 3, 3, 3), None, "same"), TypeError, "padding"),
        ((torch.randn(2, 3, 4, 4), torch.randn(1, 3, 3, 3), None, (1, 1, 1)), TypeError, "padding"),
    ],
)
def test_bad_input(arguments, error, message):
    with pytest.raises(error, match=message):
        few_channel_conv2d(*arguments)


@needs_kernel
def test_the_kernel_rejects_what_it_cannot_compute():
    x, weight = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 3, 3)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.dfkd_fast.narrow_conv2d(x.double(), weight.double(), None, [1, 1])
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.dfkd_fast.narrow_conv2d(x, torch.randn(1, 2, 3, 3), None, [1, 1])
    with pytest.raises(ValueError, match="padding"):
        torch.ops.dfkd_fast.narrow_conv2d(x, weight, None, [-1, 1])
    with pytest.raises(ValueError, match="smaller than the kernel"):
        torch.ops.dfkd_fast.narrow_conv2d(x, torch.randn(1, 3, 7, 7), None, [0, 0])


def test_the_layer_matches_conv2d_and_keeps_its_state_dict():
    torch.manual_seed(0)
    layer = FewChannelConv2d(16, 1, 3, padding=1)
    conv = nn.Conv2d(16, 1, 3, padding=1)
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 6, 7).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)
    assert set(layer.state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="padding"):
        FewChannelConv2d(3, 1, 3, padding="same")


@pytest.mark.parametrize("make", [lenet5, lenet5_half, lambda: Generator(8, (1, 28, 28), 4)],
                         ids=["lenet5", "lenet5_half", "generator"])  # fmt: skip
def test_models_use_the_layer_and_load_plain_conv_state_dicts(make):
    torch.manual_seed(0)
    model = make()
    assert any(isinstance(m, FewChannelConv2d) for m in model.modules())
    plain = make()
    for module in plain.modules():
        if isinstance(module, FewChannelConv2d):
            module.__class__ = nn.Conv2d
    model.load_state_dict(plain.state_dict())
    torch.testing.assert_close(model.state_dict(), plain.state_dict(), rtol=0, atol=0)
