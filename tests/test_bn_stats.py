"""dfkd_fast.bn_stats / bn_stat_loss / batch_norm_with_stat_loss against float64 autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dfkd_fast
from dfkd_fast.ops.bn_stats import bn_stats_reference, statistics_loss_reference

from .paths import CUDA_AVAILABLE, INTERPRETER, path_fixture
from .tolerances import BN_GRAD, BN_LOSS, BN_OUTPUT, BN_STATS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, channels_last): odd channel counts, H * W of 1, 7 x 7 and 32 x 32, BatchNorm1d shapes;
# in channels_last, rows that do not fill the kernel's last block of 256 or its last run of rows.
SHAPES = [
    ((16, 3), False),
    ((6, 17, 9), False),
    ((4, 3, 1, 1), False),
    ((5, 17, 7, 7), False),
    ((5, 17, 7, 7), True),
    ((3, 512, 4, 4), True),
    ((2, 3, 32, 32), False),
    ((2, 3, 32, 32), True),
    ((3, 5, 11, 13), True),
    ((4, 16, 9, 9), True),
]


path = path_fixture("bn_stat_loss", has_cpu_kernel=True)


def make_activation(shape, channels_last, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Channel means far from 0 make one-pass sum-of-squares variances cancel: a test of Welford.
    offsets = 5 * torch.randn(shape[1], generator=g).view(1, -1, *[1] * (len(shape) - 2))
    x = (torch.randn(shape, generator=g) * 2 + offsets).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def make_statistics(channels, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    running_mean = 5 * torch.randn(channels, generator=g)
    running_var = 4 * torch.rand(channels, generator=g) + 0.5
    ema_mean = running_mean + torch.randn(channels, generator=g)
    ema_var = running_var * (0.5 + torch.rand(channels, generator=g))
    return [t.to(device) for t in (running_mean, running_var, ema_mean, ema_var)]


@pytest.mark.parametrize("shape,channels_last", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_loss_statistics_and_gradient(path, shape, channels_last, dtype, momentum):
    x = make_activation(shape, channels_last, dtype, path.device)
    running_mean, running_var, ema_mean, ema_var = make_statistics(shape[1], path.device)
    ema = dict(momentum=momentum, ema_mean=ema_mean, ema_var=ema_var) if momentum else {}
    g = torch.Generator().manual_seed(2)
    # Incoming gradients exactly representable in float32, the dtype of the loss and statistics.
    grad_loss = torch.randn((), generator=g).double()
    grad_mean = torch.randn(shape[1], generator=g).double()
    grad_var = torch.randn(shape[1], generator=g).double()

    xk = x.clone().requires_grad_()
    loss, mean, var = dfkd_fast.bn_stat_loss(
        xk, running_mean, running_var, return_stats=True, **ema
    )
    assert loss.dtype == mean.dtype == var.dtype == torch.float32 and loss.shape == ()
    loss.backward(grad_loss.to(loss.device, torch.float32), inputs=[xk], retain_graph=True)
    grad_from_loss = xk.grad.clone()
    xk.grad = None
    torch.autograd.backward(
        [mean, var], [grad_mean.to(mean.device, torch.float32), grad_var.to(var.device, torch.float32)]
    )

    x64 = x.detach().cpu().double().requires_grad_()
    mean64, var64 = bn_stats_reference(x64)
    loss64 = statistics_loss_reference(
        mean64, var64, running_mean.cpu().double(), running_var.cpu().double(), momentum,
        ema_mean.cpu().double() if momentum else None, ema_var.cpu().double() if momentum else None,
    )  # fmt: skip
    (expected_from_loss,) = torch.autograd.grad(loss64 * grad_loss, x64, retain_graph=True)
    (expected_from_stats,) = torch.autograd.grad(
        (mean64 * grad_mean).sum() + (var64 * grad_var).sum(), x64
    )

    BN_LOSS.assert_close(loss, loss64)
    BN_STATS.assert_close(mean, mean64)
    BN_STATS.assert_close(var, var64)
    BN_GRAD[dtype].assert_close(grad_from_loss, expected_from_loss)
    BN_GRAD[dtype].assert_close(xk.grad, expected_from_stats)
    assert xk.grad.dtype == dtype and xk.grad.stride() == x.stride()


@pytest.mark.parametrize("shape,channels_last", SHAPES[3:6] + SHAPES[-2:-1], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_with_stat_loss_is_one_read_of_both(path, shape, channels_last, dtype):
    x = make_activation(shape, channels_last, dtype, path.device)
    running_mean, running_var, _, _ = make_statistics(shape[1], path.device)
    g = torch.Generator().manual_seed(3)
    weight = (torch.rand(shape[1], generator=g) + 0.5).to(path.device)
    bias = torch.randn(shape[1], generator=g).to(path.device)
    # Incoming gradients exactly representable in y's dtype, as autograd hands y its gradient.
    grad_y = torch.randn(shape, generator=g).to(dtype).double()

    xk = x.clone().requires_grad_()
    y, loss, mean, var = dfkd_fast.batch_norm_with_stat_loss(
        xk, running_mean, running_var, weight, bias, 1e-5
    )
    ((y.double() * grad_y.to(y.device)).sum() + 2.0 * loss).backward()

    x64 = x.detach().cpu().double().requires_grad_()
    y64 = F.batch_norm(x64, running_mean.cpu().double(), running_var.cpu().double(),
                       weight.cpu().double(), bias.cpu().double(), False, 0.0, 1e-5)  # fmt: skip
    mean64, var64 = bn_stats_reference(x64)
    loss64 = statistics_loss_reference(
        mean64, var64, running_mean.cpu().double(), running_var.cpu().double()
    )
    ((y64 * grad_y).sum() + 2.0 * loss64).backward()

    assert y.dtype == dtype and y.stride() == x.stride()
    BN_OUTPUT[dtype].assert_close(y, y64)
    BN_LOSS.assert_close(loss, loss64)
    BN_STATS.assert_close(mean, mean64)
    BN_GRAD[dtype].assert_close(xk.grad, x64.grad)


def test_batch_norm_parameters_that_need_gradients_get_them(path):
    x = make_activation((4, 5, 3, 3), False, torch.float32, path.device)
    running_mean, running_var, _, _ = make_statistics(5, path.device)
    weight = torch.rand(5, device=path.device).requires_grad_()
    bias = torch.randn(5, device=path.device).requires_grad_()
    y, loss, _, _ = dfkd_fast.batch_norm_with_stat_loss(x, running_mean, running_var, weight, bias)
    (y.sum() + loss).backward()
    reference = F.batch_norm(x, running_mean, running_var, weight.detach().requires_grad_(),
                             bias.detach().requires_grad_(), False, 0.0, 1e-5)  # fmt: skip
    expected_weight_grad = (x - running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        running_var.view(1, -1, 1, 1) + 1e-5
    )
    BN_STATS.assert_close(weight.grad, expected_weight_grad.sum(dim=(0, 2, 3)))
    BN_STATS.assert_close(bias.grad, torch.full((5,), 36.0))
    BN_OUTPUT[torch.float32].assert_close(y, reference)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_output_rounds_to_nearest_even_as_torch_does(path, channels_last):
    """y = x * 1 + shift, exact in float32, stored in bfloat16: halfway cases go to the even
    neighbour, past the largest bfloat16 to inf, NaN stays NaN; the rest bit for bit as torch."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, 3, generator=g) * 3
    x[:, 0], x[:, 1] = 1.0, 1.0 + 2**-7  # even and odd last mantissa bits of bfloat16
    x[:, 2] = torch.finfo(torch.bfloat16).max
    x[0, 3, 0, 0] = float("nan")
    shift = torch.tensor([2**-8, 2**-8, 1e36, 0.5, -0.25, 0.0])
    shift[3:] += torch.rand(3, generator=g)
    x = x.to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # (x - running_mean) / sqrt(running_var + eps) = x + shift
    y, *_ = dfkd_fast.batch_norm_with_stat_loss(
        x.to(path.device), -shift.to(path.device), torch.ones(6, device=path.device), eps=0.0
    )
    expected = (x.float() + shift.view(1, -1, 1, 1)).to(torch.bfloat16)
    y = y.cpu()
    assert torch.equal(y.isnan(), expected.isnan()) and y.isnan().sum() == 1
    finite = ~expected.isnan()
    assert torch.equal(y[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert (y[:, 0] == 1.0).all() and (y[:, 1] == 1.0 + 2**-6).all() and y[:, 2].isinf().all()


def test_zero_norms_give_zero_gradients(path):
    x = torch.tensor([[1.0, 3.0], [3.0, 1.0]], device=path.device).requires_grad_()
    running_mean = torch.tensor([2.0, 2.0], device=path.device)  # the batch mean exactly
    running_var = torch.tensor([1.0, 1.0], device=path.device)  # and its variance
    loss = dfkd_fast.bn_stat_loss(x, running_mean, running_var)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_statistics_of_a_single_pass_are_cancellation_free(path):
    # var = 1 around a mean of 1e4: sum and sum of squares would lose it entirely in float32
    g = torch.Generator().manual_seed(4)
    x = (1e4 + torch.randn(64, 3, 8, 8, generator=g)).to(path.device)
    mean, var = dfkd_fast.bn_stats(x)
    mean64, var64 = bn_stats_reference(x.cpu().double())
    BN_STATS.assert_close(mean, mean64)
    BN_STATS.assert_close(var, var64)


# ------------------------------------------------------------------------------------------
# PyTorch integration
# ------------------------------------------------------------------------------------------


OPERATORS = ["bn_stat_loss"] + (["bn_stat_loss_triton"] if INTERPRETER or CUDA_AVAILABLE else [])


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("with_running,with_ema,with_affine", [
    (False, False, False), (True, False, False), (True, True, False), (True, False, True)])  # fmt: skip
def test_opcheck(operator, with_running, with_ema, with_affine):
    device = "cuda" if CUDA_AVAILABLE and operator == "bn_stat_loss_triton" else "cpu"
    forward = getattr(torch.ops.dfkd_fast, operator)
    backward = getattr(torch.ops.dfkd_fast, operator + "_backward")
    x = make_activation((4, 5, 3, 3), True, torch.float32, device)
    running_mean, running_var, ema_mean, ema_var = make_statistics(5, device)
    scale, shift = torch.rand(5, device=device), torch.randn(5, device=device)
    args = (
        x.requires_grad_(),
        running_mean if with_running else None,
        running_var if with_running else None,
        ema_mean if with_ema else None,
        ema_var if with_ema else None,
        0.9 if with_ema else 0.0,
        scale if with_affine else None,
        shift if with_affine else None,
    )
    torch.library.opcheck(forward.default, args)
    loss, mean, var, y, norms = forward(x.detach(), *args[1:])
    grads = (
        torch.randn_like(loss) if with_running else None,
        torch.randn_like(mean),
        None,
        torch.randn_like(y) if with_affine else None,
    )
    torch.library.opcheck(
        backward.default, (x.detach(), mean, var, norms, *args[1:6], args[6], *grads)
    )


def test_torch_compile_fullgraph_on_the_default_cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the C++ kernels, through their operator
    x = make_activation((8, 6, 5, 5), True, torch.float32, "cpu")
    running_mean, running_var, ema_mean, ema_var = make_statistics(6, "cpu")
    weight, bias = torch.rand(6), torch.randn(6)

    def matching_loss(x):
        y, fused_loss, _, _ = dfkd_fast.batch_norm_with_stat_loss(
            x, running_mean, running_var, weight, bias
        )
        loss = dfkd_fast.bn_stat_loss(
            x, running_mean, running_var, momentum=0.5, ema_mean=ema_mean, ema_var=ema_var
        )
        return loss + fused_loss + y.square().mean()

    compiled = torch.compile(matching_loss, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xc).backward()
    matching_loss(xe).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

X = torch.zeros(4, 3, 2, 2)
RM, RV = torch.zeros(3), torch.ones(3)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((X, torch.zeros(4), RV), {}, ValueError, "running_mean must have one value per channel"),
        ((X, RM, torch.ones(2)), {}, ValueError, "running_var must have one value per channel"),
        ((torch.zeros(1, 3), RM, RV), {}, ValueError, "at least 2 values per channel"),
        ((torch.zeros(1, 3, 1, 1), RM, RV), {}, ValueError, "at least 2 values per channel"),
        ((torch.zeros(3), RM, RV), {}, ValueError, r"shape \(N, C, \*\)"),
        ((X.long(), RM, RV), {}, TypeError, "x must be a floating"),
        ((X, RM.long(), RV), {}, TypeError, "running_mean must be a floating"),
        ((X, RM.to("meta"), RV), {}, ValueError, "running_mean must be on the device"),
        ((X, RM, RV.to("meta")), {}, ValueError, "running_var must be on the device"),
        ((X.numpy(), RM, RV), {}, TypeError, "x must be a torch.Tensor"),
        ((X, RM, RV), dict(momentum=1.0), ValueError, "momentum"),
        ((X, RM, RV), dict(momentum=-0.1), ValueError, "momentum"),
        ((X, RM, RV), dict(momentum="0.9"), TypeError, "momentum"),
        ((X, RM, RV), dict(momentum=0.9, ema_mean=RM), ValueError, "together"),
        ((X, RM, RV), dict(momentum=0.9, ema_mean=RM, ema_var=torch.ones(5)), ValueError, "ema_var"),
    ],
)
def test_bad_input_is_rejected_with_the_argument_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        dfkd_fast.bn_stat_loss(*args, **kwargs)


def test_batch_norm_with_stat_loss_rejects_bad_parameters():
    with pytest.raises(ValueError, match="weight must have one value per channel"):
        dfkd_fast.batch_norm_with_stat_loss(X, RM, RV, weight=torch.ones(4))
    with pytest.raises(ValueError, match="eps"):
        dfkd_fast.batch_norm_with_stat_loss(X, RM, RV, eps=-1.0)
