"""Triton kernels of dfkd_fast.kd_div and dfkd_fast.js_div, and their launchers.

Imported on the first kernel launch, never by ``import dfkd_fast``. Triton decides when this
module is imported whether the kernels are compiled or interpreted (``TRITON_INTERPRET=1``).

Each program owns BLOCK_ROWS rows and walks their C logits in chunks of BLOCK_COLS, keeping per
row an online softmax normaliser for student and teacher: the running maximum m of the raw logits
and z = sum exp((x - m) / T). Working with raw-logit differences, divided by T only afterwards,
keeps large logits at small temperatures exact where it matters. Forward reads the logits once
(KL) or twice (JS, whose mixture needs both normalisers first, unless the row fits in one chunk);
backward reads them once. Nothing of size N x C is allocated besides the gradients.

Per-row statistics saved for backward, STATS[row, :] =
    (m_student, log z_student, m_teacher, log z_teacher, a, b)
with a = KL(p_t || p_s) and b = E_pt[d] for "kl", where d = (t - m_t) - (s - m_s) compares the
logits relative to their row maxima (unchanged by adding a constant to a row), and
a = KL(p_t || m) / 2, b = KL(p_s || m) / 2 for "js". Then KL = E_pt[d] / T - log z_t + log z_s,
and the KL teacher gradient p_t (log p_t - log p_s - KL) is evaluated as p_t (d - E_pt[d]) / T,
in which the large common terms cancel exactly (it is exactly 0 for one-hot rows).
"""

# No `from __future__ import annotations` here: Triton 3.0's interpreter recognises a constexpr
# parameter only by its evaluated annotation, not by the string "tl.constexpr".
from typing import Optional

import torch
import triton
import triton.language as tl

from dfkd_fast.ops.triton_utils import store_rounded

NUM_STATS = 6
MAX_BLOCK_COLS = 4096
MAX_TILE = 4096  # logits per program and chunk
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}
LN2 = 0.6931471805599453


@triton.jit
def _rescale_factor(m_old, m_new, inv_temperature):
    # exp((m_old - m_new) / T), and 0 while nothing finite was seen (keeps -inf - -inf out).
    return tl.where(m_old == float("-inf"), 0.0, tl.exp((m_old - m_new) * inv_temperature))


@triton.jit
def _exp_shifted(x, m, inv_temperature):
    # exp((x - m) / T) per row, with m = -inf (an all -inf row so far) treated as 0.
    base = tl.where(m == float("-inf"), 0.0, m)
    return tl.exp((x - base[:, None]) * inv_temperature)


@triton.jit
def _load_chunk(ptr, rows, row_stride, cols, col_stride, mask):
    offsets = rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride
    return tl.load(ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _row_relative_difference(t, m_t, s, m_s):
    # (t - m_t) - (s - m_s), with all -inf maxima read as 0.
    base_t = tl.where(m_t == float("-inf"), 0.0, m_t)
    base_s = tl.where(m_s == float("-inf"), 0.0, m_s)
    return (t - base_t[:, None]) - (s - base_s[:, None])


@triton.jit
def _log_probs(x, m, log_z, inv_temperature):
    return (x - m[:, None]) * inv_temperature - log_z[:, None]


@triton.jit
def _log1p(y):
    # log(1 + y) to full precision for small y (Goldberg's correction; no libdevice log1p).
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _log_mixture(log_p, log_q):
    # log((p + q) / 2) without forming p + q: max + log1p(exp(min - max)) - log 2.
    high = tl.maximum(log_p, log_q)
    low = tl.minimum(log_p, log_q)
    mixed = high + _log1p(tl.exp(low - high)) - 0.6931471805599453
    return tl.where(high == float("-inf"), float("-inf"), mixed)


@triton.jit
def _js_chunk(s, t, m_s, log_z_s, m_t, log_z_t, inv_temperature):
    """Per-row sums over one chunk of p_t log(p_t / m) / 2 and p_s log(p_s / m) / 2."""
    log_p_s = _log_probs(s, m_s, log_z_s, inv_temperature)
    log_p_t = _log_probs(t, m_t, log_z_t, inv_temperature)
    log_m = _log_mixture(log_p_t, log_p_s)
    p_t = tl.exp(log_p_t)
    p_s = tl.exp(log_p_s)
    a = tl.sum(tl.where(p_t > 0.0, p_t * (log_p_t - log_m), 0.0), axis=1)
    b = tl.sum(tl.where(p_s > 0.0, p_s * (log_p_s - log_m), 0.0), axis=1)
    return 0.5 * a, 0.5 * b


@triton.jit
def _online_update(m_s, z_s, m_t, z_t, kl_acc, s, t, inv_temperature, JS: tl.constexpr):
    """Folds one chunk into the per-row normalisers and, for KL, into
    kl_acc = sum exp((t - m_t) / T) d with d = (t - m_t) - (s - m_s), all at the new maxima."""
    m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
    z_s = z_s * _rescale_factor(m_s, m_s_new, inv_temperature) + tl.sum(
        _exp_shifted(s, m_s_new, inv_temperature), axis=1
    )
    m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
    rescale_t = _rescale_factor(m_t, m_t_new, inv_temperature)
    e_t = _exp_shifted(t, m_t_new, inv_temperature)
    if not JS:
        # Earlier terms: d grows by (m_t - m_t_new) + (m_s_new - m_s) when the maxima move.
        shift = tl.where(m_t == float("-inf"), 0.0, m_t - m_t_new) + tl.where(
            m_s == float("-inf"), 0.0, m_s_new - m_s
        )
        d = _row_relative_difference(t, m_t_new, s, m_s_new)
        kl_acc = (kl_acc + shift * z_t) * rescale_t + tl.sum(
            tl.where(e_t > 0.0, e_t * d, 0.0), axis=1
        )
    z_t = z_t * rescale_t + tl.sum(e_t, axis=1)
    return m_s_new, z_s, m_t_new, z_t, kl_acc


@triton.jit
def _forward_kernel(
    STUDENT, TEACHER, WEIGHT, LOSS, STATS,
    n_rows, n_cols,
    student_row_stride, student_col_stride, teacher_row_stride, teacher_col_stride,
    inv_temperature, loss_scale,
    HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr, JS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    col_offsets = tl.arange(0, BLOCK_COLS)

    m_s = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    z_s = tl.zeros((BLOCK_ROWS,), tl.float32)
    m_t = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    z_t = tl.zeros((BLOCK_ROWS,), tl.float32)
    kl_acc = tl.zeros((BLOCK_ROWS,), tl.float32)
    if SINGLE_CHUNK:  # the whole row in registers: read once, for JS too
        mask = row_mask[:, None] & (col_offsets < n_cols)[None, :]
        s = _load_chunk(STUDENT, rows, student_row_stride, col_offsets, student_col_stride, mask)
        t = _load_chunk(TEACHER, rows, teacher_row_stride, col_offsets, teacher_col_stride, mask)
        m_s, z_s, m_t, z_t, kl_acc = _online_update(
            m_s, z_s, m_t, z_t, kl_acc, s, t, inv_temperature, JS
        )
    else:
        for start in range(0, n_cols, BLOCK_COLS):
            cols = start + col_offsets
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            s = _load_chunk(STUDENT, rows, student_row_stride, cols, student_col_stride, mask)
            t = _load_chunk(TEACHER, rows, teacher_row_stride, cols, teacher_col_stride, mask)
            m_s, z_s, m_t, z_t, kl_acc = _online_update(
                m_s, z_s, m_t, z_t, kl_acc, s, t, inv_temperature, JS
            )
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)

    if JS:
        if SINGLE_CHUNK:
            a, b = _js_chunk(s, t, m_s, log_z_s, m_t, log_z_t, inv_temperature)
        else:  # the mixture needs both final normalisers: read the row again
            a = tl.zeros((BLOCK_ROWS,), tl.float32)
            b = tl.zeros((BLOCK_ROWS,), tl.float32)
            for start in range(0, n_cols, BLOCK_COLS):
                cols = start + col_offsets
                mask = row_mask[:, None] & (cols < n_cols)[None, :]
                s = _load_chunk(STUDENT, rows, student_row_stride, cols, student_col_stride, mask)
                t = _load_chunk(TEACHER, rows, teacher_row_stride, cols, teacher_col_stride, mask)
                a_part, b_part = _js_chunk(s, t, m_s, log_z_s, m_t, log_z_t, inv_temperature)
                a += a_part
                b += b_part
        divergence = a + b
    else:
        b = kl_acc / z_t  # E_pt[d]
        a = b * inv_temperature - log_z_t + log_z_s
        divergence = a

    stats = STATS + rows.to(tl.int64) * 6
    tl.store(stats + 0, m_s, mask=row_mask)
    tl.store(stats + 1, log_z_s, mask=row_mask)
    tl.store(stats + 2, m_t, mask=row_mask)
    tl.store(stats + 3, log_z_t, mask=row_mask)
    tl.store(stats + 4, a, mask=row_mask)
    tl.store(stats + 5, b, mask=row_mask)

    row_loss = divergence * loss_scale
    if HAS_WEIGHT:
        row_loss = row_loss * tl.load(WEIGHT + rows, mask=row_mask, other=0.0)
    if REDUCE == 0:
        tl.store(LOSS + rows, row_loss, mask=row_mask)
    else:
        tl.store(LOSS + pid, tl.sum(tl.where(row_mask, row_loss, 0.0), axis=0))


@triton.jit
def _backward_kernel(
    STUDENT, TEACHER, WEIGHT, STATS, GRAD_LOSS, GRAD_STUDENT, GRAD_TEACHER,
    n_rows, n_cols,
    student_row_stride, student_col_stride, teacher_row_stride, teacher_col_stride,
    inv_temperature, grad_scale,
    HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr, JS: tl.constexpr,
    NEED_STUDENT: tl.constexpr, NEED_TEACHER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    col_offsets = tl.arange(0, BLOCK_COLS)
    stats = STATS + rows.to(tl.int64) * 6
    m_s = tl.load(stats + 0, mask=row_mask, other=0.0)
    log_z_s = tl.load(stats + 1, mask=row_mask, other=0.0)
    m_t = tl.load(stats + 2, mask=row_mask, other=0.0)
    log_z_t = tl.load(stats + 3, mask=row_mask, other=0.0)
    a = tl.load(stats + 4, mask=row_mask, other=0.0)
    b = tl.load(stats + 5, mask=row_mask, other=0.0)

    # d loss / d logits = grad * weight * (reduction factor) * T^2 * (1 / T) * d divergence
    if REDUCE == 0:
        coefficient = tl.load(GRAD_LOSS + rows, mask=row_mask, other=0.0).to(tl.float32)
    else:
        coefficient = tl.zeros((BLOCK_ROWS,), tl.float32) + tl.load(GRAD_LOSS).to(tl.float32)
    coefficient = coefficient * grad_scale
    if HAS_WEIGHT:
        coefficient = coefficient * tl.load(WEIGHT + rows, mask=row_mask, other=0.0)

    grad_row_offsets = rows.to(tl.int64)[:, None] * n_cols
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + col_offsets
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        s = _load_chunk(STUDENT, rows, student_row_stride, cols, student_col_stride, mask)
        t = _load_chunk(TEACHER, rows, teacher_row_stride, cols, teacher_col_stride, mask)
        log_p_s = _log_probs(s, m_s, log_z_s, inv_temperature)
        log_p_t = _log_probs(t, m_t, log_z_t, inv_temperature)
        p_s = tl.exp(log_p_s)
        p_t = tl.exp(log_p_t)
        if JS:
            log_m = _log_mixture(log_p_t, log_p_s)
            d_s = tl.where(p_s > 0.0, p_s * (0.5 * (log_p_s - log_m) - b[:, None]), 0.0)
            d_t = tl.where(p_t > 0.0, p_t * (0.5 * (log_p_t - log_m) - a[:, None]), 0.0)
        else:
            d_s = p_s - p_t
            d = _row_relative_difference(t, m_t, s, m_s)
            d_t = tl.where(p_t > 0.0, p_t * (d - b[:, None]) * inv_temperature, 0.0)
        offsets = grad_row_offsets + cols.to(tl.int64)[None, :]
        if NEED_STUDENT:
            store_rounded(GRAD_STUDENT + offsets, coefficient[:, None] * d_s, mask)
        if NEED_TEACHER:
            store_rounded(GRAD_TEACHER + offsets, coefficient[:, None] * d_t, mask)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    block_cols = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_COLS)
    block_rows = min(triton.next_power_of_2(max(n_rows, 1)), max(1, MAX_TILE // block_cols))
    num_warps = 8 if block_rows * block_cols >= 4096 else 4
    return block_rows, block_cols, num_warps


def reduction_scale(reduction: str, n_rows: int, n_cols: int) -> float:
    """The factor that turns the sum of weighted row losses into the reduced loss."""
    if reduction in ("none", "sum"):
        return 1.0
    denominator = n_rows * n_cols if reduction == "mean" else n_rows
    return 1.0 / denominator if denominator else float("nan")


def forward(
    student: torch.Tensor,  # (rows, C), any strides
    teacher: torch.Tensor,
    weight: Optional[torch.Tensor],  # (rows,) float32, contiguous
    temperature: float,
    reduction: str,
    js: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = student.shape
    block_rows, block_cols, num_warps = _blocks(n_rows, n_cols)
    grid = triton.cdiv(n_rows, block_rows)
    reduce = REDUCTION_CODES[reduction]
    loss_rows = n_rows if reduce == 0 else grid
    loss = torch.empty(loss_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty((n_rows, NUM_STATS), dtype=torch.float32, device=student.device)
    loss_scale = temperature * temperature * reduction_scale(reduction, n_rows, n_cols)
    if grid > 0:
        _forward_kernel[(grid,)](
            student, teacher, weight if weight is not None else loss, loss, stats,
            n_rows, n_cols,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            1.0 / temperature, loss_scale,
            HAS_WEIGHT=weight is not None, REDUCE=reduce, JS=js,
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, SINGLE_CHUNK=n_cols <= block_cols,
            num_warps=num_warps,
        )  # fmt: skip
    if reduce == 0:
        return loss, stats
    if grid == 1:
        return loss.view(()), stats
    if grid == 0:
        return torch.full((), loss_scale * 0.0, device=student.device), stats
    return loss.sum(), stats


def backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    temperature: float,
    reduction: str,
    js: bool,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = student.shape
    empty = student.new_empty(0)
    grad_student = torch.empty_like(student, memory_format=torch.contiguous_format) if need_student else empty
    grad_teacher = torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_teacher else empty
    block_rows, block_cols, num_warps = _blocks(n_rows, n_cols)
    grid = triton.cdiv(n_rows, block_rows)
    if grid > 0 and (need_student or need_teacher):
        _backward_kernel[(grid,)](
            student, teacher, weight if weight is not None else stats, stats, grad_loss,
            grad_student if need_student else stats, grad_teacher if need_teacher else stats,
            n_rows, n_cols,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            1.0 / temperature, temperature * reduction_scale(reduction, n_rows, n_cols),
            HAS_WEIGHT=weight is not None, REDUCE=REDUCTION_CODES[reduction], JS=js,
            NEED_STUDENT=need_student, NEED_TEACHER=need_teacher,
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps,
        )  # fmt: skip
    return grad_student, grad_teacher
