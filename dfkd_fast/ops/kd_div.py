"""Distillation divergences between student and teacher logits, fused forward and backward.

With p_t = softmax(teacher / T) and p_s = softmax(student / T) over the last (class) dimension:

    kd_div: T^2 * KL(p_t || p_s)                       (Hinton et al., "Distilling the Knowledge in
                                                        a Neural Network", 2015: T^2 keeps gradient
                                                        magnitudes independent of T)
    js_div: T^2 * JS(p_t, p_s) = T^2 * (KL(p_t || m) + KL(p_s || m)) / 2,   m = (p_t + p_s) / 2

per row, times an optional per-row weight, then reduced: "none" (per row), "sum", "batchmean"
(sum / rows) or "mean" (sum / (rows * C), PyTorch's kl_div meaning). Gradients flow to both
logits (the teacher's too: an adversarial generator backpropagates through them) and to the
weight.

CUDA tensors run the Triton kernels of kd_div_triton.py; CPU tensors run the C++ kernels of the
compiled extension (csrc/cpu/kd_div.cpp, same formulas), or the Triton kernels under the
interpreter when TRITON_INTERPRET=1 (set before the first call). The reference below is the test
oracle and the fallback for float64 or a missing extension.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from dfkd_fast import _extension
from dfkd_fast.backend import (
    KERNEL_DTYPES,
    Implementation,
    KernelKind,
    choose_implementation,
)
from dfkd_fast.ops import _triton
from dfkd_fast.ops._checks import check_floating_tensor

__all__ = ["kd_div", "js_div", "kd_div_reference", "REDUCTIONS", "DIVERGENCES"]

OP_NAME = "kd_div"
REDUCTIONS = ("none", "sum", "mean", "batchmean")
DIVERGENCES = ("kl", "js")
NUM_STATS = 6  # per-row statistics saved by the forward kernel for backward

# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # Subtract the raw maximum before dividing by T: large logits at small T stay exact.
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    return F.log_softmax(shifted / temperature, dim=-1)


def _p_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), with value and gradient 0 where p = 0 (also when log q = -inf).

    The inner where keeps -inf out of the branch that the outer where discards, whose
    gradient would otherwise be 0 * inf = NaN.
    """
    support = log_p > -math.inf
    safe_log_p = torch.where(support, log_p, 0.0)
    safe_log_q = torch.where(support, log_q, 0.0)
    return torch.where(support, safe_log_p.exp() * (safe_log_p - safe_log_q), 0.0)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log((p + q) / 2), -inf where both are 0 (with a finite gradient there)."""
    support = (log_p > -math.inf) | (log_q > -math.inf)
    mixed = torch.logaddexp(torch.where(support, log_p, 0.0), torch.where(support, log_q, 0.0))
    return torch.where(support, mixed - math.log(2.0), -math.inf)


def divergence_rows_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    divergence: str = "kl",
) -> torch.Tensor:
    """T^2 * D(p_t, p_s) per row, shape logits.shape[:-1], in float32 (float64 for float64)."""
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    log_p_s = _log_softmax(student_logits.to(dtype), temperature)
    log_p_t = _log_softmax(teacher_logits.to(dtype), temperature)
    if divergence == "kl":
        terms = _p_log_ratio(log_p_t, log_p_s)
    else:
        log_m = _log_mixture(log_p_t, log_p_s)
        terms = 0.5 * (_p_log_ratio(log_p_t, log_m) + _p_log_ratio(log_p_s, log_m))
    return temperature**2 * terms.sum(dim=-1)


def _reduce(rows: torch.Tensor, reduction: str, num_classes: int) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    denominator = rows.numel() * (num_classes if reduction == "mean" else 1)
    return total / denominator if denominator else total * math.nan


def kd_div_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight: torch.Tensor | None = None,
    divergence: str = "kl",
) -> torch.Tensor:
    """Pure-PyTorch reference of kd_div ("kl") and js_div ("js"), differentiable by autograd."""
    rows = divergence_rows_reference(student_logits, teacher_logits, temperature, divergence)
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    return _reduce(rows, reduction, student_logits.shape[-1])


# --------------------------------------------------------------------------------------------
# The kernels' operators, fake and autograd registrations
#
# Two operators with one signature: dfkd_fast::kd_div (C++ kernels of the compiled extension, for
# CPU tensors; schema in csrc/ops.cpp) and dfkd_fast::kd_div_triton (Triton kernels, for CUDA
# tensors, or CPU tensors under TRITON_INTERPRET=1). Each returns (loss, stats): loss of shape
# (rows,) for "none" and () otherwise, float32; stats (rows, 6) float32 for the backward operator.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("dfkd_fast::kd_div_triton", mutates_args=())
def _kd_div_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: Optional[torch.Tensor],
    temperature: float,
    reduction: str,
    divergence: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _triton.check_device(student, OP_NAME)
    return _triton.kernel_module("kd_div_triton", OP_NAME).forward(student, teacher, weight, temperature, reduction, divergence == "js")


@torch.library.custom_op("dfkd_fast::kd_div_triton_backward", mutates_args=())
def _kd_div_triton_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    temperature: float,
    reduction: str,
    divergence: str,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _triton.check_device(student, OP_NAME)
    return _triton.kernel_module("kd_div_triton", OP_NAME).backward(
        grad_loss, student, teacher, weight, stats, temperature, reduction,
        divergence == "js", need_student, need_teacher,
    )  # fmt: skip


def _forward_fake(student, teacher, weight, temperature, reduction, divergence):
    rows = student.shape[0]
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=torch.float32)
    return loss, student.new_empty((rows, NUM_STATS), dtype=torch.float32)


def _backward_fake(
    grad_loss, student, teacher, weight, stats, temperature, reduction, divergence,
    need_student, need_teacher,
):  # fmt: skip
    grad_student = torch.empty_like(student) if need_student else student.new_empty(0)
    grad_teacher = torch.empty_like(teacher) if need_teacher else teacher.new_empty(0)
    return grad_student, grad_teacher


def _setup_context(ctx, inputs, output):
    student, teacher, weight, temperature, reduction, divergence = inputs
    _loss, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(student, teacher, weight, stats)
    ctx.temperature, ctx.reduction, ctx.divergence = temperature, reduction, divergence


def _weight_grad(grad_loss, stats, temperature, reduction, divergence, num_classes):
    # d loss / d weight[row] = grad * T^2 * (reduction factor) * divergence[row]
    divergence_rows = stats[:, 4] + stats[:, 5] if divergence == "js" else stats[:, 4]
    factor = temperature**2
    if reduction == "batchmean":
        factor /= max(stats.shape[0], 1)
    elif reduction == "mean":
        factor /= max(stats.shape[0] * num_classes, 1)
    return grad_loss * factor * divergence_rows


def _autograd_backward(backward_op):
    def backward(ctx, grad_loss, _grad_stats):
        student, teacher, weight, stats = ctx.saved_tensors
        need_student, need_teacher, need_weight = ctx.needs_input_grad[:3]
        grad_student = grad_teacher = grad_weight = None
        if need_student or need_teacher:
            grad_student, grad_teacher = backward_op(
                grad_loss.contiguous(), student, teacher, weight, stats, ctx.temperature,
                ctx.reduction, ctx.divergence, need_student, need_teacher,
            )  # fmt: skip
        if need_weight:
            grad_weight = _weight_grad(
                grad_loss, stats, ctx.temperature, ctx.reduction, ctx.divergence, student.shape[1]
            )
        return (
            grad_student if need_student else None,
            grad_teacher if need_teacher else None,
            grad_weight,
            None,
            None,
            None,
        )

    return backward


for _forward_name, _backward_name in [
    ("dfkd_fast::kd_div_triton", "dfkd_fast::kd_div_triton_backward"),
    ("dfkd_fast::kd_div", "dfkd_fast::kd_div_backward"),
]:
    if _forward_name == "dfkd_fast::kd_div" and not _extension.extension_loaded():
        continue
    torch.library.register_fake(_forward_name)(_forward_fake)
    torch.library.register_fake(_backward_name)(_backward_fake)

# dfkd_fast::kd_div has its autograd in C++ (csrc/kd_div_autograd.cpp), which costs less per call.
torch.library.register_autograd(
    "dfkd_fast::kd_div_triton",
    _autograd_backward(torch.ops.dfkd_fast.kd_div_triton_backward),
    setup_context=_setup_context,
)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    return reduction


def _check_inputs(student_logits, teacher_logits, temperature, reduction, weight) -> None:
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_floating_tensor(name, logits)
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"{name} needs a last (class) dimension of size >= 1, got shape "
                             f"{tuple(logits.shape)}")  # fmt: skip
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits must be on the device of student_logits ({student_logits.device}), "
            f"got {teacher_logits.device}"
        )
    check_temperature(temperature)
    check_reduction(reduction)
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if not (weight.is_floating_point() or weight.dtype == torch.bool):
            raise TypeError(f"weight must be a floating-point or bool tensor, got {weight.dtype}")
        if weight.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"weight must hold one value per row, shape {tuple(student_logits.shape[:-1])}, "
                f"got {tuple(weight.shape)}"
            )
        if weight.device != student_logits.device:
            raise ValueError(
                f"weight must be on the device of the logits ({student_logits.device}), "
                f"got {weight.device}"
            )


def _divergence(student_logits, teacher_logits, temperature, reduction, weight, divergence):
    _check_inputs(student_logits, teacher_logits, temperature, reduction, weight)
    temperature = float(temperature)
    # A kernel dtype for both logits, else the reference (the float64 one, say).
    dtype = student_logits.dtype if teacher_logits.dtype in KERNEL_DTYPES else teacher_logits.dtype
    implementation = choose_implementation(OP_NAME, KernelKind.TRITON, student_logits.device, dtype)
    if implementation is Implementation.REFERENCE:
        return kd_div_reference(
            student_logits, teacher_logits, temperature, reduction, weight, divergence
        )
    if implementation is Implementation.EXTENSION:
        operator = torch.ops.dfkd_fast.kd_div
    else:
        operator = torch.ops.dfkd_fast.kd_div_triton
    loss, _stats = operator(
        _as_rows(student_logits),
        _as_rows(teacher_logits),
        None if weight is None else _as_rows(weight.to(torch.float32), per_row=True),
        temperature,
        reduction,
        divergence,
    )
    if reduction == "none" and student_logits.dim() != 2:
        return loss.view(student_logits.shape[:-1])
    return loss


def _as_rows(tensor: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """(rows, C) logits or (rows,) weights; no new autograd node when already so shaped."""
    wanted_dim = 1 if per_row else 2
    if tensor.dim() == wanted_dim:
        return tensor
    return tensor.reshape(-1) if per_row else tensor.reshape(-1, tensor.shape[-1])


def kd_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last dimension.

    Args:
        student_logits, teacher_logits: (N, ..., C) logits, float32, float16 or bfloat16 (any
            strides; float32 arithmetic inside); float64 runs the reference.
        temperature: T > 0.
        reduction: "none" (shape (N, ...)), "sum", "batchmean" (sum / rows) or "mean"
            (sum / (rows * C)).
        weight: optional per-row weight of shape (N, ...) (a 0/1 or bool mask, agreement
            weights); multiplies each row's divergence before the reduction.

    Returns the float32 loss (float64 for float64 inputs); gradients flow to both logits and
    to the weight.
    """
    return _divergence(student_logits, teacher_logits, temperature, reduction, weight, "kl")


def js_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * JS(softmax(teacher / T), softmax(student / T)), the Jensen-Shannon divergence
    (PRE-DFKD's adversarial term), computed from log-probabilities (no log of a rounded mixture).
    Arguments and return as :func:`kd_div`."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, weight, "js")
