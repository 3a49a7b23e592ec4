"""Data-free distillation: the methods (adversarial, pre-dfkd, memory-bank), their engine and
their reports. Entry point: :func:`distill`, which the package itself also is:
``dfkd_fast.distill(teacher, student, config)`` calls it. :func:`compare_runs` puts finished runs
side by side. A run stopped by SIGINT or SIGTERM raises :class:`RunStopped` after
checkpointing its last step."""

import sys
import types

from dfkd_fast.distill.compare import Comparison, compare_runs
from dfkd_fast.distill.config import FIELD_HELP, METHODS, PRESETS, DistillConfig, preset_config
from dfkd_fast.distill.engine import DistillResult, check_networks, distill
from dfkd_fast.stopping import RunStopped

__all__ = [
    "Comparison",
    "FIELD_HELP",
    "METHODS",
    "PRESETS",
    "DistillConfig",
    "DistillResult",
    "RunStopped",
    "check_networks",
    "compare_runs",
    "distill",
    "preset_config",
]


class _DistillPackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> DistillResult:
        """``dfkd_fast.distill(teacher, student, config, ...)``: see :func:`distill`."""
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _DistillPackage
