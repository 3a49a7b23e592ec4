"""Side-by-side summary of finished distillation runs: one JSON, one Markdown table, one plot.

    python3 benchmarks/compare_runs.py runs/mnist-adversarial runs/mnist-pre-dfkd \
        runs/mnist-memory-bank --json benchmarks/results/distill-mnist-cpu.json \
        --plot docs/img/mnist-accuracy.png --title "MNIST, LeNet-5 -> LeNet-5-half"
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from dfkd_fast.distill.report import plot_curves, robustness
from dfkd_fast.io import atomic_write_json

COLUMNS = ("final", "best", "mean", "variance", "final - best", "first step at 95%",
           "replay memory", "wall time", "student img/s", "drawn per source")  # fmt: skip


def machine() -> dict:
    description = {"python": platform.python_version(), "torch": torch.__version__,
                   "cpu": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name()
    return description


def summary_row(name: str, metrics: dict) -> list[str]:
    numbers = robustness(metrics["curve"])
    return [
        name,
        f"{numbers['final_accuracy']:.2%}",
        f"{numbers['best_accuracy']:.2%}",
        f"{numbers['mean_accuracy']:.2%}",
        f"{numbers['accuracy_variance']:.2e}",
        f"{numbers['final_minus_best']:+.2%}",
        str(numbers["first_step_at_accuracy"]["0.95"] or "never"),
        f"{metrics['replay_memory_bytes'] / 2**20:.2f} MiB",
        f"{metrics['seconds'] / 60:.1f} min",
        f"{metrics['student_images_per_second']:.0f}",
        ", ".join(f"{name} {share:.1%}" for name, share in
                  metrics.get("drawn_fraction_per_source", {}).items()) or "-",
    ]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of finished runs")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--plot", type=Path, help="write the accuracy curves here (PNG)")
    parser.add_argument("--title", default="student accuracy")
    arguments = parser.parse_args(argv)
    runs = {}
    for folder in arguments.runs:
        metrics = json.loads((folder / "metrics.json").read_text())
        if not metrics.get("finished"):
            print(f"{folder}: run not finished, left out", file=sys.stderr)
            continue
        runs[folder.name] = metrics
    print(markdown_table([summary_row(name, metrics) for name, metrics in runs.items()]))
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(arguments.json, {"machine": machine(), "runs": runs})
    if arguments.plot:
        arguments.plot.parent.mkdir(parents=True, exist_ok=True)
        curves = {name: metrics["curve"] for name, metrics in runs.items()}
        plot_curves(arguments.plot, curves, arguments.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
