"""Triton kernels of dfkd_fast.bn_stats / bn_stat_loss / batch_norm_with_stat_loss, and their
launchers. Imported on the first kernel launch, never by ``import dfkd_fast``.

x is viewed as (N, C, S) with any strides (NCHW, channels_last, (N, C), (N, C, L)); m = n * S + s
indexes the M = N * S values of a channel.

Forward, two launches: a grid of (channel blocks) x (slices of m) reads each tile of x once,
optionally writes y = x * scale[c] + shift[c] (an eval-mode BatchNorm), and keeps per channel
(count, mean, M2) of x - x[0, c, 0] by merging each chunk's exact two-pass statistics with Chan's
formula (never sum and sum of squares, which cancel; the shift keeps large means exact). One program then merges the slices in a fixed order and, given
running statistics, blends with the ema and computes the loss
    ||a|| + ||b||,   a = mean' - running_mean,   b = var' - running_var,   mean' = (1 - m) mean + m ema
Backward, one elementwise pass:
    grad_x = grad_y * scale[c] + g_mean[c] / M + g_var[c] * 2 (x - mean[c]) / M,
    g_mean = grad_mean + grad_loss (1 - m) a / ||a||,   g_var = grad_var + grad_loss (1 - m) b / ||b||
with a zero norm contributing nothing.
"""

# No `from __future__ import annotations` here: Triton 3.0's interpreter recognises a constexpr
# parameter only by its evaluated annotation, not by the string "tl.constexpr".
from typing import Optional

import torch
import triton
import triton.language as tl

from dfkd_fast.ops.triton_utils import store_rounded

MAX_TILE = 4096  # elements per program and chunk


@triton.jit
def _tile_offsets(channels, m, S, stride_n, stride_c, stride_s):
    n = m // S
    s = m - n * S
    return channels.to(tl.int64)[:, None] * stride_c + (
        n.to(tl.int64) * stride_n + s.to(tl.int64) * stride_s
    )[None, :]


@triton.jit
def _data_shift(X, channels, channel_mask, x_stride_c):
    return tl.load(X + channels.to(tl.int64) * x_stride_c, mask=channel_mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _partials_kernel(
    X, Y, SCALE, SHIFT, PARTIALS,
    C, M, S, m_per_program,
    x_stride_n, x_stride_c, x_stride_s, y_stride_n, y_stride_c, y_stride_s,
    WRITE_Y: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    m_start = pid_m * m_per_program
    m_end = tl.minimum(m_start + m_per_program, M)
    if WRITE_Y:
        scale = tl.load(SCALE + channels, mask=channel_mask, other=0.0)
        shift = tl.load(SHIFT + channels, mask=channel_mask, other=0.0)

    # Statistics of x - K, K = x[0, c, 0] for every program: sums of small numbers stay exact
    # when the channel mean is large; K is added back when the slices are merged.
    k = _data_shift(X, channels, channel_mask, x_stride_c)
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for chunk_start in range(m_start, m_end, BLOCK_M):
        m = chunk_start + tl.arange(0, BLOCK_M)
        m_mask = m < m_end
        mask = channel_mask[:, None] & m_mask[None, :]
        x_offsets = _tile_offsets(channels, m, S, x_stride_n, x_stride_c, x_stride_s)
        x = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
        if WRITE_Y:
            y_offsets = _tile_offsets(channels, m, S, y_stride_n, y_stride_c, y_stride_s)
            store_rounded(Y + y_offsets, x * scale[:, None] + shift[:, None], mask)
        shifted = tl.where(mask, x - k[:, None], 0.0)
        chunk_count = tl.sum(m_mask.to(tl.float32), axis=0)
        chunk_mean = tl.sum(shifted, axis=1) / chunk_count
        centred = tl.where(mask, shifted - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(centred * centred, axis=1)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean = mean + delta * (chunk_count / total)
        m2 = m2 + chunk_m2 + delta * delta * (count * chunk_count / total)
        count = total

    partials = PARTIALS + (pid_m.to(tl.int64) * C + channels) * 3
    tl.store(partials + 0, tl.zeros((BLOCK_C,), tl.float32) + count, mask=channel_mask)
    tl.store(partials + 1, mean, mask=channel_mask)
    tl.store(partials + 2, m2, mask=channel_mask)


@triton.jit
def _blend(batch, EMA, channels, channel_mask, momentum, HAS_EMA: tl.constexpr):
    if HAS_EMA:
        ema = tl.load(EMA + channels, mask=channel_mask, other=0.0)
        return (1.0 - momentum) * batch + momentum * ema
    return batch


@triton.jit
def _finalize_kernel(
    X, PARTIALS, MEAN, VAR, RUNNING_MEAN, RUNNING_VAR, EMA_MEAN, EMA_VAR, LOSS, NORMS,
    C, num_slices, momentum, x_stride_c,
    HAS_RUNNING: tl.constexpr, HAS_EMA: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program: merge the slices of every channel, then the norms over all channels.
    squares_mean = tl.zeros((BLOCK_C,), tl.float32)
    squares_var = tl.zeros((BLOCK_C,), tl.float32)
    for channel_start in range(0, C, BLOCK_C):
        channels = channel_start + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        count = tl.zeros((BLOCK_C,), tl.float32)
        mean = tl.zeros((BLOCK_C,), tl.float32)
        m2 = tl.zeros((BLOCK_C,), tl.float32)
        for slice_index in range(0, num_slices):
            partials = PARTIALS + (slice_index * C + channels) * 3
            slice_count = tl.load(partials + 0, mask=channel_mask, other=0.0)
            slice_mean = tl.load(partials + 1, mask=channel_mask, other=0.0)
            slice_m2 = tl.load(partials + 2, mask=channel_mask, other=0.0)
            total = count + slice_count
            weight = tl.where(total > 0.0, slice_count / total, 0.0)
            delta = slice_mean - mean
            mean = mean + delta * weight
            m2 = m2 + slice_m2 + delta * delta * count * weight
            count = total
        var = m2 / tl.where(count > 0.0, count, 1.0)
        mean = mean + _data_shift(X, channels, channel_mask, x_stride_c)
        tl.store(MEAN + channels, mean, mask=channel_mask)
        tl.store(VAR + channels, var, mask=channel_mask)
        if HAS_RUNNING:
            running_mean = tl.load(RUNNING_MEAN + channels, mask=channel_mask, other=0.0)
            running_var = tl.load(RUNNING_VAR + channels, mask=channel_mask, other=0.0)
            a = _blend(mean, EMA_MEAN, channels, channel_mask, momentum, HAS_EMA) - running_mean
            b = _blend(var, EMA_VAR, channels, channel_mask, momentum, HAS_EMA) - running_var
            squares_mean += tl.where(channel_mask, a * a, 0.0)
            squares_var += tl.where(channel_mask, b * b, 0.0)
    if HAS_RUNNING:
        norm_mean = tl.sqrt(tl.sum(squares_mean, axis=0))
        norm_var = tl.sqrt(tl.sum(squares_var, axis=0))
        tl.store(NORMS + 0, norm_mean)
        tl.store(NORMS + 1, norm_var)
        tl.store(LOSS, norm_mean + norm_var)


@triton.jit
def _backward_kernel(
    X, GRAD_Y, GRAD_X, MEAN, VAR, GRAD_MEAN, GRAD_VAR, SCALE,
    RUNNING_MEAN, RUNNING_VAR, EMA_MEAN, EMA_VAR, NORMS, GRAD_LOSS,
    C, M, S, inv_count, momentum,
    x_stride_n, x_stride_c, x_stride_s,
    gy_stride_n, gy_stride_c, gy_stride_s,
    gx_stride_n, gx_stride_c, gx_stride_s,
    HAS_GRAD_Y: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr, HAS_GRAD_VAR: tl.constexpr,
    HAS_GRAD_LOSS: tl.constexpr, HAS_EMA: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = channel_mask[:, None] & (m < M)[None, :]
    mean = tl.load(MEAN + channels, mask=channel_mask, other=0.0)

    # Per-channel gradients of the statistics, from the outputs used and from the loss.
    g_mean = tl.zeros((BLOCK_C,), tl.float32)
    g_var = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_GRAD_MEAN:
        g_mean += tl.load(GRAD_MEAN + channels, mask=channel_mask, other=0.0)
    if HAS_GRAD_VAR:
        g_var += tl.load(GRAD_VAR + channels, mask=channel_mask, other=0.0)
    if HAS_GRAD_LOSS:
        var = tl.load(VAR + channels, mask=channel_mask, other=0.0)
        grad_loss = tl.load(GRAD_LOSS).to(tl.float32) * (1.0 - momentum)
        norm_mean = tl.load(NORMS + 0)
        norm_var = tl.load(NORMS + 1)
        running_mean = tl.load(RUNNING_MEAN + channels, mask=channel_mask, other=0.0)
        running_var = tl.load(RUNNING_VAR + channels, mask=channel_mask, other=0.0)
        a = _blend(mean, EMA_MEAN, channels, channel_mask, momentum, HAS_EMA) - running_mean
        b = _blend(var, EMA_VAR, channels, channel_mask, momentum, HAS_EMA) - running_var
        g_mean += tl.where(norm_mean > 0.0, grad_loss * a / norm_mean, 0.0)
        g_var += tl.where(norm_var > 0.0, grad_loss * b / norm_var, 0.0)

    grad = tl.zeros((BLOCK_C, BLOCK_M), tl.float32) + (g_mean * inv_count)[:, None]
    x_offsets = _tile_offsets(channels, m, S, x_stride_n, x_stride_c, x_stride_s)
    x = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    grad += (2.0 * g_var * inv_count)[:, None] * (x - mean[:, None])
    if HAS_GRAD_Y:
        scale = tl.load(SCALE + channels, mask=channel_mask, other=0.0)
        gy_offsets = _tile_offsets(channels, m, S, gy_stride_n, gy_stride_c, gy_stride_s)
        grad += tl.load(GRAD_Y + gy_offsets, mask=mask, other=0.0).to(tl.float32) * scale[:, None]
    gx_offsets = _tile_offsets(channels, m, S, gx_stride_n, gx_stride_c, gx_stride_s)
    store_rounded(GRAD_X + gx_offsets, grad, mask)


def _blocks(x3: torch.Tensor) -> tuple[int, int, int]:
    """Tile shape: wide along m when a channel's values are contiguous (NCHW), wide along the
    channels when the channels are (channels_last)."""
    C, M = x3.shape[1], x3.shape[0] * x3.shape[2]
    if x3.stride(1) == 1 and C > 1:
        block_c = min(triton.next_power_of_2(C), 128)
        block_m = min(triton.next_power_of_2(M), max(1, MAX_TILE // block_c))
    else:
        block_m = min(triton.next_power_of_2(M), 1024)
        block_c = min(triton.next_power_of_2(C), max(1, MAX_TILE // block_m))
    num_warps = 8 if block_c * block_m >= 4096 else 4
    return block_c, block_m, num_warps


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another


def forward(
    x3: torch.Tensor,  # (N, C, S), any strides
    running_mean: Optional[torch.Tensor],  # (C,) float32: also compute the loss
    running_var: Optional[torch.Tensor],
    ema_mean: Optional[torch.Tensor],  # (C,) float32: blend before the loss
    ema_var: Optional[torch.Tensor],
    momentum: float,
    scale: Optional[torch.Tensor],  # (C,) float32: also write y = x * scale + shift into y3
    shift: Optional[torch.Tensor],
    y3: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean, var, norms); loss and norms are empty without running statistics."""
    N, C, S = x3.shape
    M = N * S
    device = x3.device
    block_c, block_m, num_warps = _blocks(x3)
    channel_blocks = triton.cdiv(C, block_c)
    slices = max(1, min(triton.cdiv(M, block_m), _target_programs(device) // channel_blocks))
    m_per_program = triton.cdiv(triton.cdiv(M, slices), block_m) * block_m
    slices = triton.cdiv(M, m_per_program)
    partials = torch.empty((slices, C, 3), dtype=torch.float32, device=device)
    mean = torch.empty(C, dtype=torch.float32, device=device)
    var = torch.empty(C, dtype=torch.float32, device=device)
    has_running = running_mean is not None
    loss = torch.empty((), dtype=torch.float32, device=device) if has_running else mean.new_empty(0)
    norms = torch.empty(2, dtype=torch.float32, device=device) if has_running else mean.new_empty(0)
    write_y = y3 is not None
    y_strides = y3.stride() if write_y else (0, 0, 0)
    _partials_kernel[(channel_blocks, slices)](
        x3, y3 if write_y else x3, scale if write_y else mean, shift if write_y else mean,
        partials, C, M, S, m_per_program,
        x3.stride(0), x3.stride(1), x3.stride(2), *y_strides,
        WRITE_Y=write_y, BLOCK_C=block_c, BLOCK_M=block_m, num_warps=num_warps,
    )  # fmt: skip
    has_ema = ema_mean is not None
    _finalize_kernel[(1,)](
        x3, partials, mean, var,
        running_mean if has_running else mean, running_var if has_running else mean,
        ema_mean if has_ema else mean, ema_var if has_ema else mean,
        loss if has_running else mean, norms if has_running else mean,
        C, slices, momentum, x3.stride(1),
        HAS_RUNNING=has_running, HAS_EMA=has_ema, BLOCK_C=min(triton.next_power_of_2(C), 1024),
    )  # fmt: skip
    return loss, mean, var, norms


def backward(
    x3: torch.Tensor,
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
    grad_y3: Optional[torch.Tensor],
    grad_x3: torch.Tensor,  # (N, C, S) output
) -> None:
    N, C, S = x3.shape
    M = N * S
    block_c, block_m, num_warps = _blocks(x3)
    grid = (triton.cdiv(C, block_c), triton.cdiv(M, block_m))
    gy_strides = grad_y3.stride() if grad_y3 is not None else (0, 0, 0)
    has_ema = ema_mean is not None
    _backward_kernel[grid](
        x3, grad_y3 if grad_y3 is not None else x3, grad_x3, mean, var,
        grad_mean if grad_mean is not None else mean, grad_var if grad_var is not None else mean,
        scale if scale is not None else mean,
        running_mean if running_mean is not None else mean,
        running_var if running_var is not None else mean,
        ema_mean if has_ema else mean, ema_var if has_ema else mean,
        norms if grad_loss is not None else mean, grad_loss if grad_loss is not None else mean,
        C, M, S, 1.0 / M, momentum,
        x3.stride(0), x3.stride(1), x3.stride(2), *gy_strides, *grad_x3.stride(),
        HAS_GRAD_Y=grad_y3 is not None, HAS_GRAD_MEAN=grad_mean is not None,
        HAS_GRAD_VAR=grad_var is not None, HAS_GRAD_LOSS=grad_loss is not None,
        HAS_EMA=has_ema, BLOCK_C=block_c, BLOCK_M=block_m, num_warps=num_warps,
    )  # fmt: skip
