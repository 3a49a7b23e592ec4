"""BatchNorm statistics of an activation, and the DeepInversion loss that matches them.

For a BatchNorm input x of shape (N, C, *), per channel c over its M = N * prod(*) values:

    mean_c = sum x / M,      var_c = sum (x - mean_c)^2 / M      (biased, as BatchNorm normalises)
    bn_stat_loss = ||mean - running_mean||_2 + ||var - running_var||_2

(Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020:
plain, not squared, norms). With ``momentum`` m, the batch statistics are first blended with an
exponential moving average of earlier batches' statistics, (1 - m) * batch + m * ema (Fang et al.,
"Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022).

The gradient needs one elementwise pass: d/dx = g_mean[c] / M + g_var[c] * 2 (x - mean_c) / M.
``batch_norm_with_stat_loss`` also returns an eval-mode BatchNorm's output from the same read of x.

CUDA tensors run the Triton kernels of bn_stats_triton.py; CPU tensors run the C++ kernels of the
compiled extension (csrc/cpu/bn_stats.cpp), or the Triton kernels under the interpreter when
TRITON_INTERPRET=1 (set before the first call). The reference (torch.var_mean, F.batch_norm) is
the test oracle and the fallback for float64 or a missing extension.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from dfkd_fast import _extension
from dfkd_fast.backend import (
    Implementation,
    KernelKind,
    choose_implementation,
)
from dfkd_fast.ops import _triton
from dfkd_fast.ops._checks import check_floating_tensor

__all__ = [
    "batch_norm_scale_shift",
    "batch_norm_with_stat_loss",
    "bn_stat_loss",
    "bn_stats",
    "bn_stats_reference",
    "statistics_loss_reference",
]

OP_NAME = "bn_stat_loss"  # dfkd_fast::bn_stat_loss, the C++ CPU operator

# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _reduced_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def bn_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, in float32 (float64 for float64 inputs)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    var, mean = torch.var_mean(x, dim=_reduced_dims(x), correction=0)
    return mean, var


def statistics_loss_reference(
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float = 0.0,
    ema_mean: torch.Tensor | None = None,
    ema_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """||mean' - running_mean||_2 + ||var' - running_var||_2, mean' = (1 - m) mean + m ema."""
    if ema_mean is not None:
        mean = (1.0 - momentum) * mean + momentum * ema_mean.detach().to(mean.dtype)
        var = (1.0 - momentum) * var + momentum * ema_var.detach().to(var.dtype)
    return torch.linalg.vector_norm(mean - running_mean.to(mean.dtype)) + (
        torch.linalg.vector_norm(var - running_var.to(var.dtype))
    )


# --------------------------------------------------------------------------------------------
# The Triton operator: registration, fake and autograd
# --------------------------------------------------------------------------------------------


def _as_ncs(tensor: torch.Tensor) -> torch.Tensor:
    """A (N, C, S) view of a (N, C, *) tensor (S = 1 for (N, C)); raises if no view exists."""
    if tensor.dim() == 2:
        return tensor.unsqueeze(-1)
    return tensor.view(tensor.shape[0], tensor.shape[1], -1)


def _viewable_as_ncs(tensor: torch.Tensor) -> torch.Tensor:
    try:
        _as_ncs(tensor)
        return tensor
    except RuntimeError:  # strides that do not merge (say, swapped H and W): copy once
        return tensor.contiguous()


@torch.library.custom_op("dfkd_fast::bn_stat_loss_triton", mutates_args=())
def _bn_stat_loss_triton(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    ema_mean: Optional[torch.Tensor],
    ema_var: Optional[torch.Tensor],
    momentum: float,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean, var, y, norms). Channel vectors are float32. loss (0-d) and norms (2,) are
    empty without running statistics; y = x * scale[c] + shift[c] is empty without scale."""
    _triton.check_device(x, OP_NAME)
    x = _viewable_as_ncs(x)
    y = _viewable_as_ncs(torch.empty_like(x)) if scale is not None else x.new_empty(0)
    loss, mean, var, norms = _triton.kernel_module("bn_stats_triton", OP_NAME).forward(
        _as_ncs(x), running_mean, running_var, ema_mean, ema_var, momentum,
        scale, shift, _as_ncs(y) if scale is not None else None,
    )  # fmt: skip
    return loss, mean, var, y, norms


@_bn_stat_loss_triton.register_fake
def _bn_stat_loss_triton_fake(x, running_mean, running_var, ema_mean, ema_var, momentum, scale,
                              shift):  # fmt: skip
    mean = x.new_empty(x.shape[1], dtype=torch.float32)
    has_running = running_mean is not None
    loss = mean.new_empty(()) if has_running else mean.new_empty(0)
    norms = mean.new_empty(2) if has_running else mean.new_empty(0)
    y = torch.empty_like(x) if scale is not None else x.new_empty(0)
    return loss, mean, torch.empty_like(mean), y, norms


@torch.library.custom_op("dfkd_fast::bn_stat_loss_triton_backward", mutates_args=())
def _bn_stat_loss_triton_backward(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    norms: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    ema_mean: Optional[torch.Tensor],
    ema_var: Optional[torch.Tensor],
    momentum: float,
    scale: Optional[torch.Tensor],
    grad_loss: Optional[torch.Tensor],
    grad_mean: Optional[torch.Tensor],
    grad_var: Optional[torch.Tensor],
    grad_y: Optional[torch.Tensor],
) -> torch.Tensor:
    _triton.check_device(x, OP_NAME)
    channels = x.shape[1]
    for name, vector in (("mean", mean), ("var", var), ("grad_mean", grad_mean),
                         ("grad_var", grad_var), ("running_mean", running_mean),
                         ("running_var", running_var), ("ema_mean", ema_mean), ("ema_var", ema_var),
                         ("scale", scale)):  # fmt: skip
        if vector is not None and vector.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(vector.shape)}")
    if grad_loss is not None and (running_mean is None or norms.shape != (2,)):
        raise ValueError("grad_loss needs the running statistics and the forward's norms")
    if grad_y is not None and (scale is None or grad_y.shape != x.shape):
        raise ValueError("grad_y needs scale and the shape of x")
    x = _viewable_as_ncs(x)
    grad_x = _viewable_as_ncs(torch.empty_like(x))
    _triton.kernel_module("bn_stats_triton", OP_NAME).backward(
        _as_ncs(x), mean, var, norms, running_mean, running_var, ema_mean, ema_var, momentum,
        scale,
        None if grad_loss is None else grad_loss.float(),
        None if grad_mean is None else grad_mean.float().contiguous(),
        None if grad_var is None else grad_var.float().contiguous(),
        None if grad_y is None else _as_ncs(_viewable_as_ncs(grad_y)),
        _as_ncs(grad_x),
    )  # fmt: skip
    return grad_x


@_bn_stat_loss_triton_backward.register_fake
def _bn_stat_loss_triton_backward_fake(x, *_):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, running_mean, running_var, ema_mean, ema_var, momentum, scale, _shift = inputs
    _loss, mean, var, _y, norms = output
    ctx.save_for_backward(x, mean, var, norms, running_mean, running_var, ema_mean, ema_var, scale)
    ctx.momentum = momentum
    ctx.mark_non_differentiable(norms)
    ctx.set_materialize_grads(False)  # an output left unused costs nothing in backward


def _autograd_backward(backward_op):
    def backward(ctx, grad_loss, grad_mean, grad_var, grad_y, _grad_norms):
        if any(ctx.needs_input_grad[1:]):
            raise RuntimeError(
                "the bn_stat_loss operators differentiate x only, not the running statistics, "
                "the ema or scale/shift (the public functions run the reference when those "
                "need it)"
            )
        x, mean, var, norms, running_mean, running_var, ema_mean, ema_var, scale = (
            ctx.saved_tensors
        )
        if scale is None:
            grad_y = None  # y was empty
        if running_mean is None:
            grad_loss = None  # so was the loss
        if not ctx.needs_input_grad[0] or all(
            grad is None for grad in (grad_loss, grad_mean, grad_var, grad_y)
        ):
            return (None,) * 8
        grad_x = backward_op(
            x, mean, var, norms, running_mean, running_var, ema_mean, ema_var, ctx.momentum,
            scale, grad_loss, grad_mean, grad_var, grad_y,
        )  # fmt: skip
        return (grad_x,) + (None,) * 7

    return backward


for _forward_name, _backward_name in [
    ("dfkd_fast::bn_stat_loss_triton", "dfkd_fast::bn_stat_loss_triton_backward"),
    ("dfkd_fast::bn_stat_loss", "dfkd_fast::bn_stat_loss_backward"),
]:
    if _forward_name == "dfkd_fast::bn_stat_loss":
        if not _extension.extension_loaded():
            continue
        torch.library.register_fake(_forward_name)(_bn_stat_loss_triton_fake)
        torch.library.register_fake(_backward_name)(_bn_stat_loss_triton_backward_fake)
    torch.library.register_autograd(
        _forward_name,
        _autograd_backward(getattr(torch.ops.dfkd_fast, _backward_name.split("::")[1])),
        setup_context=_setup_context,
    )


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _check_activation(x) -> None:
    check_floating_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *), got {tuple(x.shape)}")
    values_per_channel = x.numel() // x.shape[1] if x.shape[1] else 0
    if values_per_channel < 2:
        raise ValueError(
            f"x must hold at least 2 values per channel for a variance, got {values_per_channel} "
            f"(shape {tuple(x.shape)})"
        )


def _check_channel_vector(name: str, value, x: torch.Tensor) -> None:
    check_floating_tensor(name, value)
    if value.shape != (x.shape[1],):
        raise ValueError(
            f"{name} must have one value per channel of x ({x.shape[1]}), got shape "
            f"{tuple(value.shape)}"
        )
    if value.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {value.device}")


def _check_momentum(x, momentum, ema_mean, ema_var) -> float:
    """The momentum to blend with: 0 when there is no ema yet."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if (ema_mean is None) != (ema_var is None):
        raise ValueError("ema_mean and ema_var must be given together")
    if ema_mean is None or momentum == 0.0:
        return 0.0
    _check_channel_vector("ema_mean", ema_mean, x)
    _check_channel_vector("ema_var", ema_var, x)
    return float(momentum)


def _kernel_operator(x: torch.Tensor):
    """The operator that runs x's kernels, or None for the reference."""
    implementation = choose_implementation(OP_NAME, KernelKind.TRITON, x.device, x.dtype)
    if implementation is Implementation.REFERENCE:
        return None
    if implementation is Implementation.EXTENSION:
        return torch.ops.dfkd_fast.bn_stat_loss
    return torch.ops.dfkd_fast.bn_stat_loss_triton


def _float32(vector: torch.Tensor | None) -> torch.Tensor | None:
    return None if vector is None else vector.detach().float().contiguous()


def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of a BatchNorm input x of shape (N, C, *), any memory
    format, in float32 (float64 for float64 x); differentiable with respect to x."""
    _check_activation(x)
    operator = _kernel_operator(x)
    if operator is None:
        return bn_stats_reference(x)
    _, mean, var, _, _ = operator(x, None, None, None, None, 0.0, None, None)
    return mean, var


def bn_stat_loss(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    momentum: float = 0.0,
    ema_mean: torch.Tensor | None = None,
    ema_var: torch.Tensor | None = None,
    return_stats: bool = False,
):
    """DeepInversion's BatchNorm-statistic loss of one layer:
    ||mean(x) - running_mean||_2 + ||var(x) - running_var||_2 over the channels.

    With ``momentum`` m > 0 and ``ema_mean``/``ema_var`` given, the batch statistics are blended
    first: (1 - m) * batch + m * ema (the ema gets no gradient). Returns the 0-d float32 loss, or
    ``(loss, mean, var)`` with the batch statistics when ``return_stats`` (to update an ema).
    A zero norm has a zero gradient. Gradients flow to x only.
    """
    _check_activation(x)
    _check_channel_vector("running_mean", running_mean, x)
    _check_channel_vector("running_var", running_var, x)
    momentum = _check_momentum(x, momentum, ema_mean, ema_var)
    if momentum == 0.0:
        ema_mean = ema_var = None
    operator = _kernel_operator(x)
    if operator is not None:
        loss, mean, var, _, _ = operator(
            x, _float32(running_mean), _float32(running_var), _float32(ema_mean),
            _float32(ema_var), momentum, None, None,
        )  # fmt: skip
    else:
        mean, var = bn_stats_reference(x)
        loss = statistics_loss_reference(
            mean, var, running_mean.detach(), running_var.detach(), momentum, ema_mean, ema_var
        )
    return (loss, mean, var) if return_stats else loss


def batch_norm_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, both float32 (C,) and without gradient."""
    with torch.no_grad():
        scale = torch.rsqrt(running_var.float() + eps)
        if weight is not None:
            scale = scale * weight.float()
        shift = -running_mean.float() * scale
        if bias is not None:
            shift = shift + bias.float()
    return scale.contiguous(), shift.contiguous()


def batch_norm_with_stat_loss(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    momentum: float = 0.0,
    ema_mean: torch.Tensor | None = None,
    ema_var: torch.Tensor | None = None,
    scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm, y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,
    with the BatchNorm-statistic loss of x (see :func:`bn_stat_loss`), from one read of x by the
    kernels: returns (y, loss, mean, var).

    Gradients flow to x through y and the loss together. When weight or bias need gradients,
    it runs the reference (F.batch_norm and torch.var_mean), which provides them.
    ``scale_shift`` may pass precomputed :func:`batch_norm_scale_shift` values.
    """
    _check_activation(x)
    _check_channel_vector("running_mean", running_mean, x)
    _check_channel_vector("running_var", running_var, x)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            _check_channel_vector(name, value, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
        math.isfinite(eps) and eps >= 0
    ):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    momentum = _check_momentum(x, momentum, ema_mean, ema_var)
    if momentum == 0.0:
        ema_mean = ema_var = None
    parameters_need_grad = any(p is not None and p.requires_grad for p in (weight, bias))
    operator = None if parameters_need_grad else _kernel_operator(x)
    if operator is None:
        # One upcast for both uses, so that x's gradient is summed in float32 and rounded once.
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        y = F.batch_norm(wide, running_mean, running_var, weight, bias, False, 0.0, eps).to(x.dtype)
        mean, var = bn_stats_reference(wide)
        loss = statistics_loss_reference(
            mean, var, running_mean.detach(), running_var.detach(), momentum, ema_mean, ema_var
        )
        return y, loss, mean, var
    scale, shift = scale_shift or batch_norm_scale_shift(
        running_mean, running_var, weight, bias, eps
    )
    loss, mean, var, y, _ = operator(
        x, _float32(running_mean), _float32(running_var), _float32(ema_mean), _float32(ema_var),
        momentum, scale, shift,
    )  # fmt: skip
    return y, loss, mean, var
