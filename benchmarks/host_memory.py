"""The CPU distillation step with and without `retain_freed_host_memory` (what the CLI calls at
start-up): wall time, page faults and system time per step. The setting changes the whole
process, so each measurement runs in a child process of its own, the two settings in turn.
Run:

    python benchmarks/host_memory.py --json benchmarks/results/host-memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dfkd_fast.distill import preset_config
from dfkd_fast.host_memory import retain_freed_host_memory
from harness import device_name, random_networks_run

SETTINGS = ("glibc defaults", "retained")


def measure_step(preset: str, method: str, retain: bool, warmup: int, steps: int) -> dict:
    applied = retain_freed_host_memory() if retain else False
    run = random_networks_run(preset_config(preset, method=method))
    config = run.config
    first = config.first_replay_step  # replay on, as in 90% of a run
    for step in range(first, first + warmup):
        run.step_function(run, step)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for step in range(first + warmup, first + warmup + steps):
        run.step_function(run, step)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "retained": applied,
        "ms_per_step": 1e3 * seconds / steps,
        "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "system_ms_per_step": 1e3 * (after.ru_stime - before.ru_stime) / steps,
        "user_ms_per_step": 1e3 * (after.ru_utime - before.ru_utime) / steps,
    }


def child(arguments) -> dict:
    command = [sys.executable, __file__, "--child", arguments.preset, arguments.method,
               str(int(arguments.retain)), str(arguments.warmup), str(arguments.steps)]  # fmt: skip
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        preset, method, retain, warmup, steps = sys.argv[2:]
        print(json.dumps(measure_step(preset, method, retain == "1", int(warmup), int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--method", default="pre-dfkd")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per setting")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    runs = {setting: [] for setting in SETTINGS}
    for round_ in range(arguments.rounds):
        for setting in SETTINGS:
            arguments.retain = setting == "retained"
            runs[setting].append(child(arguments))
            print(f"round {round_ + 1} {setting:15s} " + "  ".join(
                f"{key} {value:.1f}" for key, value in runs[setting][-1].items()
                if key != "retained"))  # fmt: skip
    summary = {
        setting: {key: statistics.median(run[key] for run in results)
                  for key in results[0] if key != "retained"}
        for setting, results in runs.items()
    }  # fmt: skip
    speedup = summary[SETTINGS[0]]["ms_per_step"] / summary[SETTINGS[1]]["ms_per_step"]
    print(f"median ms/step: {summary[SETTINGS[0]]['ms_per_step']:.1f} -> "
          f"{summary[SETTINGS[1]]['ms_per_step']:.1f} ({speedup:.3f}x)")  # fmt: skip
    if arguments.json:
        report = {"device": device_name("cpu"), "torch": torch.__version__,
                  "preset": arguments.preset, "method": arguments.method,
                  "warmup_steps": arguments.warmup, "timed_steps": arguments.steps,
                  "runs": runs, "median": summary, "speedup": speedup}  # fmt: skip
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
