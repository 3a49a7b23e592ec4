"""The devices a run may name: the CPU and CUDA devices. A name is checked twice: its form when a
config is made (it may be meant for another machine), and that the device exists when the work
starts, so that a missing GPU is a clear error and not a traceback from deep inside torch."""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def check_device_name(device, name: str = "device") -> None:
    """A TypeError or ValueError naming `name` unless `device` is the str 'cpu', 'cuda' or
    'cuda:N' (configs hold the name, so that they stay plain data)."""
    if not isinstance(device, str):
        raise TypeError(f"{name} must be a str such as 'cpu' or 'cuda:0', got {device!r}")
    if not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"{name} must be cpu, cuda or cuda:N, got {device!r}")


def available_device(device, name: str = "device") -> torch.device:
    """`device` (a name or a torch.device) as a torch.device, after checking that this machine
    has it."""
    check_device_name(str(device) if isinstance(device, torch.device) else device, name)
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"{name} {str(device)!r}: no CUDA device is available (torch "
                             f"{torch.__version__} is {build}); use cpu")  # fmt: skip
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} {str(device)!r}: this machine has {count} CUDA device(s)")
    return device
