"""What ops a call ran, as torch.profiler saw them, for the tests of dispatch."""

from __future__ import annotations

import torch


def op_calls(function, op_name: str) -> int:
    """How many times ``function()`` called the op ``op_name`` (e.g. "dfkd_fast::max_pool2x2")."""
    with torch.profiler.profile() as profile:
        function()
    return sum(event.name == op_name for event in profile.events())
