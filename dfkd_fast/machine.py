"""What a run or a benchmark ran on, for its report: results differ between CPUs (their speed,
and the kernels picked for their instruction sets round differently), so a number is only
comparable with others made on the same kind of machine."""

from __future__ import annotations

import platform

import torch

from dfkd_fast.backend import BFLOAT16_CPU_FLAGS, cpu_flags, read_cpuinfo


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (or the text given), else what `platform` says."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def machine_description(device: str | torch.device | None = None) -> dict:
    """Python and torch versions, the CPU's model, the instruction set PyTorch's CPU kernels use
    (AVX2, AVX512, ...), the CPU's bfloat16 flags, the thread count, and the GPU's name when
    `device` is a CUDA device (asking for it starts CUDA, which a CPU run should not). Plain data,
    so that it can go into JSON and checkpoints."""
    cpuinfo = read_cpuinfo()
    description = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "cpu": cpu_model(cpuinfo),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bfloat16_flags": sorted(cpu_flags(cpuinfo) & BFLOAT16_CPU_FLAGS),
        "threads": torch.get_num_threads(),
    }
    if device is not None and torch.device(device).type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def machine_label(description: dict) -> str:
    """One line for a table: "Intel Xeon (AVX512, amx_bf16 avx512_bf16), 2 threads"; only the
    parts a description has (older runs recorded fewer)."""
    features = [description.get("cpu_capability"), " ".join(description.get("bfloat16_flags", []))]
    features = ", ".join(feature for feature in features if feature)
    label = description.get("cpu", "unknown CPU") + (f" ({features})" if features else "")
    if "threads" in description:
        label += f", {description['threads']} threads"
    if "gpu" in description:
        label += f"; {description['gpu']}"
    return label
