"""Data-free distillation: the methods (adversarial, pre-dfkd, memory-bank), their engine and
their reports. Entry point: :func:`distill`."""

from dfkd_fast.distill.config import METHODS, PRESETS, DistillConfig, preset_config
from dfkd_fast.distill.engine import DistillResult, check_networks, distill

__all__ = [
    "METHODS",
    "PRESETS",
    "DistillConfig",
    "DistillResult",
    "check_networks",
    "distill",
    "preset_config",
]
