"""Where a distillation step's time goes: one preset's workload (its networks, randomly
initialised, replay from the first step) on one device, measured three ways in one process.

1. Plain: steps back to back, one synchronisation at the end (what a run costs).
2. By part: the device synchronised around each part the step marks (`Run.phase`: generator
   update, replay update, student batches, student update), wall time per part.
3. Under torch.profiler: the ops and device kernels that take the most time, kernel launches per
   step, and the device's busy time against the plain step (a low fraction: the step waits on
   the host, on Python and launches, not on the device).
On CUDA also the synchronising calls of one step (torch.cuda.set_sync_debug_mode), by place in
the code: a step should make none. Run:

    python benchmarks/profile_step.py --preset cifar10 --device cuda \
        --json benchmarks/results/profile-cifar10-h100.json
    python benchmarks/profile_step.py --preset mnist --set channels_last=false --steps 3
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import os
import shutil
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dfkd_fast.host_memory import retain_freed_host_memory
from harness import PRESET_NETWORKS, device_name, preset_run, synchronize
from step_configs import config_problem, parse_override

PROJECT_PACKAGE = f"{os.sep}dfkd_fast{os.sep}"  # frames in the library itself


def step(run) -> None:
    run.step_function(run, run.config.steps)


def plain_milliseconds(run, steps: int) -> float:
    device = run.device.type
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(run)
    synchronize(device)
    return 1e3 * (time.perf_counter() - start) / steps


def phase_milliseconds(run, steps: int) -> dict[str, float]:
    """Wall milliseconds per step of each part the step marks, the device synchronised at each
    part's start and end; `other` is the rest of the step."""
    device = run.device.type
    totals = collections.defaultdict(float)

    @contextlib.contextmanager
    def timed_phase(name):
        synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(device)
            totals[name] += time.perf_counter() - start

    run.phase = timed_phase
    try:
        whole = plain_milliseconds(run, steps)
    finally:
        del run.phase  # the class's record_function again
    parts = {name: 1e3 * seconds / steps for name, seconds in totals.items()}
    parts["other"] = max(0.0, whole - sum(parts.values()))
    return {"step": whole, **parts}


def self_device_microseconds(event) -> float:
    # torch < 2.4 names it after CUDA
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def is_device_work(event) -> bool:
    """A kernel, copy or set on the device; not a range of the step (`Run.phase`) mirrored on the
    device's timeline, which would count its kernels twice."""
    return (event.device_type != torch.autograd.DeviceType.CPU
            and not getattr(event, "is_user_annotation", False)
            and not event.key.startswith("dfkd_fast."))  # fmt: skip


def export_trace(profiler, path: Path) -> None:
    """The profiled steps as a Chrome trace (chrome://tracing, Perfetto), gzipped for a .gz path."""
    if path.suffix != ".gz":
        profiler.export_chrome_trace(str(path))
        return
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(plain))
        with plain.open("rb") as source, gzip.open(path, "wb") as target:
            shutil.copyfileobj(source, target)


def profiled(run, steps: int, top: int, trace: Path | None = None) -> dict:
    on_cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step(run)
        synchronize(run.device.type)
    if trace is not None:
        export_trace(profiler, trace)
    averages = profiler.key_averages()
    by_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    result = {
        "profiled_steps": steps,
        "top_cpu_ops": [{"name": e.key, "calls_per_step": e.count / steps,
                         "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
                        for e in by_cpu[:top]],  # fmt: skip
        "aten_calls_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps,
    }
    if on_cuda:
        device_events = [e for e in profiler.events() if is_device_work(e)]
        busy = sum(e.time_range.end - e.time_range.start for e in device_events)
        kernels = sorted((e for e in averages if is_device_work(e)), key=self_device_microseconds,
                         reverse=True)  # fmt: skip
        result.update(
            device_events_per_step=len(device_events) / steps,
            device_busy_ms_per_step=busy / 1e3 / steps,
            top_device_kernels=[{"name": e.key, "calls_per_step": e.count / steps,
                                 "device_ms_per_step": self_device_microseconds(e) / 1e3 / steps}
                                for e in kernels[:top]],  # fmt: skip
        )
    return result


def warning_places(function, text: str) -> dict[str, int]:
    """Calls `function` and counts the warnings whose message holds `text` by the place that
    raised them: the innermost frame in dfkd_fast, or else the innermost one (file:line, code)."""
    places = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if text not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        ours = [f for f in frames if PROJECT_PACKAGE in f.filename]
        where = (ours or frames)[-1]
        places[f"{Path(where.filename).name}:{where.lineno} ({where.line})"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        function()
    return dict(places.most_common())


def synchronizing_calls(run) -> dict[str, int]:
    """The calls of one step that made the host wait for the device, by place in the code."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return warning_places(lambda: step(run), "called a synchronizing CUDA operation")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def profile_step(preset: str, device: str, steps: int, warmup: int, top: int,
                 overrides: dict, trace: Path | None = None) -> dict:  # fmt: skip
    run = preset_run(preset, device=device, **{"method": "pre-dfkd", **overrides})
    for _ in range(warmup):  # the replay memory filled, kernels compiled and autotuned
        step(run)
    plain = plain_milliseconds(run, steps)
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "preset": preset,
        "networks": "{} -> {}".format(*PRESET_NETWORKS[preset][:2]),
        "config": {name: value for name, value in run.config.to_dict().items()
                   if name in ("method", "batch_size", "student_steps", "vae_batch_size",
                               "replay_batch_size", "channels_last", "amp", "cpu_amp")
                   or name in overrides},  # fmt: skip
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "images_per_step": run.config.batch_size * (1 + run.config.student_steps),
        "step_ms": plain,
        "phase_ms": phase_milliseconds(run, steps),
        **profiled(run, steps, top, trace),
    }
    if device == "cuda":
        report["device_busy_fraction"] = report["device_busy_ms_per_step"] / plain
        report["synchronizing_calls_per_step"] = synchronizing_calls(run)
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['preset']} ({report['networks']}) on {report['device']}: "
             f"{report['step_ms']:.1f} ms per step, "
             f"{1e3 * report['images_per_step'] / report['step_ms']:.0f} images/s", "",
             "| part of the step | ms (synchronised) | share |", "|---|---:|---:|"]  # fmt: skip
    phases = report["phase_ms"]
    for name, ms in phases.items():
        if name != "step":
            lines.append(f"| {name} | {ms:.2f} | {ms / phases['step']:.0%} |")
    lines.append(f"| whole step | {phases['step']:.2f} | |")
    lines += ["", f"aten calls per step: {report['aten_calls_per_step']:.0f}"]
    if "device_busy_ms_per_step" in report:
        lines.append(f"device kernels and copies per step: {report['device_events_per_step']:.0f}, "
                     f"busy {report['device_busy_ms_per_step']:.1f} ms of the "
                     f"{report['step_ms']:.1f} ms step ({report['device_busy_fraction']:.0%})")
        calls = report["synchronizing_calls_per_step"]
        lines.append(f"synchronising calls in a step: {sum(calls.values())}")
        lines += [f"  {count} x {place}" for place, count in calls.items()]
        lines += ["", "| device kernel | calls/step | ms/step |", "|---|---:|---:|"]
        lines += [f"| {k['name'][:90]} | {k['calls_per_step']:.1f} | {k['device_ms_per_step']:.2f} |"
                  for k in report["top_device_kernels"]]  # fmt: skip
    lines += ["", "| op (self CPU time) | calls/step | ms/step |", "|---|---:|---:|"]
    lines += [f"| {o['name'][:90]} | {o['calls_per_step']:.1f} | {o['self_cpu_ms_per_step']:.2f} |"
              for o in report["top_cpu_ops"]]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESET_NETWORKS), default="cifar10")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="steps in each measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="ops and kernels listed")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append",
                        default=[], metavar="FIELD=VALUE", help="a DistillConfig field's value")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its algorithms for each shape")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trace", type=Path, help="write the profiled steps' Chrome trace here "
                        "(gzipped if it ends in .gz; a few MB a step on a GPU)")
    arguments = parser.parse_args(argv)
    if arguments.steps < 1 or arguments.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    problem = config_problem(arguments.preset, dict(arguments.overrides))
    if problem:
        parser.error(f"--set: {problem}")
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.backends.cudnn.benchmark = arguments.cudnn_benchmark
    retain_freed_host_memory()  # as the CLI does
    report = profile_step(arguments.preset, arguments.device, arguments.steps, arguments.warmup,
                          arguments.top, dict(arguments.overrides), arguments.trace)  # fmt: skip
    print(markdown(report))
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
