"""Shared pieces of the benchmarks: devices, synchronisation, and the bytes an op must move."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from dfkd_fast.distill import preset_config
from dfkd_fast.distill.engine import Run
from dfkd_fast.host_memory import retain_freed_host_memory
from dfkd_fast.machine import cpu_model
from dfkd_fast.models import build_classifier

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """fn, followed by a device synchronisation so that its wall time is the kernels' time."""

    def run():
        result = fn()
        synchronize(device)
        return result

    return run


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def peak_memory_bytes(run, device: str) -> int | None:
    """Peak device memory allocated during one call of `run` (CUDA only; None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    run()
    return torch.cuda.max_memory_allocated() - baseline


def describe(benchmark, device: str, **info) -> None:
    """Records the case in pytest-benchmark's JSON for benchmarks/report.py."""
    benchmark.extra_info.update(
        device=device,
        device_name=device_name(device),
        torch=torch.__version__,
        **info,
    )


def random_networks_run(config, teacher_arch: str = "lenet5", student_arch: str = "lenet5_half",
                        image_shape=(1, 32, 32)) -> Run:  # fmt: skip
    """A distillation run of randomly initialised networks (seed 0): a step costs what it costs
    with a trained teacher, and no file is needed."""
    torch.manual_seed(0)
    teacher = build_classifier(teacher_arch, 10, image_shape[0])
    student = build_classifier(student_arch, 10, image_shape[0])
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
    return Run(teacher, student, config, image_shape, bn_layers=has_bn)


# preset -> the networks and image shape of its workload (random weights cost what trained ones do)
PRESET_NETWORKS = {
    "mnist": ("lenet5", "lenet5_half", (1, 32, 32)),
    "cifar10": ("resnet56", "resnet20", (3, 32, 32)),
}


def preset_run(preset: str, **overrides) -> Run:
    """A run of the preset's networks, randomly initialised, with replay from the first step so
    that every step of a replay method is a full one."""
    config = preset_config(preset, **{"replay_start": 0.0, **overrides})
    return random_networks_run(config, *PRESET_NETWORKS[preset])


def interleaved_step_medians(steppers: dict, blocks: int, steps_per_block: int) -> dict:
    """Median milliseconds of each of `steppers` (name -> a function that runs one step), the
    steppers taking turns in blocks, the order reversed every other block, so that a machine that
    speeds up or slows down during the measurement affects all of them alike. The first step of
    each block is not timed."""
    seconds = {name: [] for name in steppers}
    for block in range(blocks):
        order = list(steppers) if block % 2 == 0 else list(reversed(steppers))
        for name in order:
            steppers[name]()
            for _ in range(steps_per_block):
                start = time.perf_counter()
                steppers[name]()
                seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def compare_step_variants(run, switches: dict, blocks: int, steps_per_block: int) -> dict:
    """Median milliseconds of one run's step under each variant (name -> a function that switches
    the run's networks to it, the first the faster candidate, the second its baseline), taking
    turns as interleaved_step_medians does, after one untimed step of each."""

    def stepper(switch):
        def step():
            switch()
            run.step_function(run, run.config.steps)
            synchronize(run.device.type)

        return step

    steppers = {name: stepper(switch) for name, switch in switches.items()}
    for step in steppers.values():
        step()
    medians = interleaved_step_medians(steppers, blocks, steps_per_block)
    first, second = list(medians)[:2]
    return {"median_ms": medians, "speedup": medians[second] / medians[first],
            "steps_timed": blocks * steps_per_block}  # fmt: skip


def add_step_comparison_arguments(parser) -> None:
    """The arguments of the scripts that compare two versions of a preset's step."""
    from step_configs import parse_override

    parser.add_argument("--preset", default="mnist", choices=["mnist", "cifar10"])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        type=parse_override, help="a DistillConfig field's value")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps-per-block", type=int, default=3)
    parser.add_argument("--json", type=Path)


def parse_step_comparison(parser) -> tuple:
    """(arguments, config overrides) of a step comparison, its preset's config checked; freed
    host memory is kept for reuse, as the CLI's runs keep it."""
    from step_configs import config_problem

    arguments = parser.parse_args()
    overrides = dict(arguments.set)
    problem = config_problem(arguments.preset, overrides)
    if problem:
        parser.error(problem)
    retain_freed_host_memory()
    return arguments, overrides


def report_step_comparison(arguments, result: dict, detail: str = "") -> None:
    """Prints a step comparison's medians and speed-up; writes them to --json if given."""
    medians = result["median_ms"]
    print(f"{arguments.preset} on {device_name(arguments.device)}: "
          + ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items())
          + f", speed-up {result['speedup']:.3f}x{detail}")  # fmt: skip
    if arguments.json:
        report = {"device": device_name(arguments.device), "torch": torch.__version__, **result}
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
