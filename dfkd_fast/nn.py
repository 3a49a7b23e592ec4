"""Thin modules over the functional ops: they hold hyperparameters and call the ops."""

from __future__ import annotations

import torch
from torch import nn

from dfkd_fast.ops.kd_div import check_reduction, check_temperature, js_div, kd_div


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
