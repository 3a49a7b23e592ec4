"""Thin modules over the functional ops: they hold hyperparameters and call the ops."""

from __future__ import annotations

import torch
from torch import nn

from dfkd_fast.ops.few_channel_conv import few_channel_conv2d
from dfkd_fast.ops.kd_div import check_reduction, check_temperature, js_div, kd_div
from dfkd_fast.ops.upsample_conv import KERNEL_SIZE, upsample_conv2d


class KDLoss(nn.Module):
    """``kd_div`` with a fixed temperature and reduction: T^2 * KL(p_teacher || p_student)."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean"):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_div(student_logits, teacher_logits, self.temperature, self.reduction, weight)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class JSDivLoss(KDLoss):
    """``js_div`` with a fixed temperature and reduction: T^2 * JS(p_teacher, p_student)."""

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return js_div(student_logits, teacher_logits, self.temperature, self.reduction, weight)


class UpsampleConv2d(nn.Conv2d):
    """``nn.Upsample(scale_factor=2)`` then ``nn.Conv2d(in_channels, out_channels, 3,
    padding=1)``, as ``upsample_conv2d``: the same parameters as that convolution, 16/36 of its
    multiply-adds."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, KERNEL_SIZE, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return "scale_factor=2, " + super().extra_repr()


class FewChannelConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)`` (stride 1, zero
    padding) computed by ``few_channel_conv2d``: faster on the CPU for a layer with few output
    channels (an image generator's last) or few input channels (a classifier's first)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0,
                 bias: bool = True):  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        if isinstance(self.padding, str):
            raise ValueError(f"padding must be an int or a pair of ints, got {padding!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_channel_conv2d(x, self.weight, self.bias, self.padding)

