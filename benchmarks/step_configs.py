"""The pre-dfkd step of a preset (`mnist` unless told) under other values of one config field,
the variants taking turns in blocks within one process (see step_interleaved.py for why). Each
variant is a separate run of the preset's networks, randomly initialised, with replay from the
first step, so every timed step is a full one: generator update, VAE update, the student
updates. Run:

    python benchmarks/step_configs.py --field vae_batch_size --values 128 64 \
        --json benchmarks/results/step-vae-batch-cpu.json
    python benchmarks/step_configs.py --preset cifar10 --device cuda --field channels_last \
        --values false true --set batch_size=128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dfkd_fast.distill import DistillConfig, preset_config
from dfkd_fast.host_memory import retain_freed_host_memory
from harness import PRESET_NETWORKS, device_name, interleaved_step_medians, preset_run, synchronize


def field_value(field: str, text: str):
    """`text` converted to the type of DistillConfig's `field`, the type of its default (as the
    CLI converts it); a bool from 1/true/yes or anything else."""
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    if field not in defaults:
        raise ValueError(f"{field!r} is not a DistillConfig field")
    kind = type(defaults[field])
    return text.lower() in ("1", "true", "yes") if kind is bool else kind(text)


def parse_override(text: str) -> tuple[str, object]:
    name, separator, value = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"--set takes FIELD=VALUE, got {text!r}")
    try:
        return name, field_value(name, value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def config_problem(preset: str, overrides: dict) -> str | None:
    """What is wrong with the pre-dfkd run of `preset` under `overrides`, for a usage error; None
    when the config is sound. These benchmarks build data-free runs, with no collection."""
    overrides = {"method": "pre-dfkd", **overrides}
    if overrides["method"] == "unlabeled":
        return "the unlabeled method needs a collection; these benchmarks time data-free methods"
    try:
        preset_config(preset, **overrides)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


def full_step(run) -> None:
    run.step_function(run, run.config.steps)
    synchronize(run.device.type)


def measure(field: str, values: list, blocks: int, steps_per_block: int, preset: str = "mnist",
            device: str = "cpu", overrides: dict | None = None) -> dict:  # fmt: skip
    steppers = {}
    for value in values:
        run = preset_run(preset, device=device,
                         **{"method": "pre-dfkd", **(overrides or {}), field: value})  # fmt: skip
        for _ in range(3):
            full_step(run)
        steppers[str(value)] = lambda run=run: full_step(run)
    medians = interleaved_step_medians(steppers, blocks, steps_per_block)
    baseline = medians[str(values[0])]
    return {"field": field, "median_ms": medians,
            "speedup_over_first": {name: baseline / ms for name, ms in medians.items()},
            "steps_timed_each": blocks * steps_per_block}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--field", required=True, help="a DistillConfig field, e.g. vae_batch_size")
    parser.add_argument("--values", nargs="+", required=True, help="the first is the baseline")
    parser.add_argument("--preset", choices=sorted(PRESET_NETWORKS), default="mnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append",
                        default=[], metavar="FIELD=VALUE", help="another DistillConfig field's value")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--steps-per-block", type=int, default=3)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    if len(arguments.values) < 2:
        parser.error("--values needs at least two values to compare")
    retain_freed_host_memory()  # as the CLI does
    try:
        values = [field_value(arguments.field, text) for text in arguments.values]
    except ValueError as error:
        parser.error(f"--field: {error}")
    for value in values:
        problem = config_problem(arguments.preset, {**dict(arguments.overrides), arguments.field: value})
        if problem:
            parser.error(f"{arguments.field}={value}: {problem}")
    result = measure(arguments.field, values, arguments.blocks, arguments.steps_per_block,
                     arguments.preset, arguments.device, dict(arguments.overrides))  # fmt: skip
    for name, ms in result["median_ms"].items():
        print(f"{arguments.field}={name}: {ms:.1f} ms per step, "
              f"{result['speedup_over_first'][name]:.3f}x the first")  # fmt: skip
    if arguments.json:
        teacher, student, _ = PRESET_NETWORKS[arguments.preset]
        report = {"device": device_name(arguments.device), "torch": torch.__version__,
                  "workload": f"{arguments.preset} preset, pre-dfkd, {teacher} -> {student}",
                  "overrides": dict(arguments.overrides),
                  **result}  # fmt: skip
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
