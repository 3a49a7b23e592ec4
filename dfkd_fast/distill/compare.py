"""Finished runs side by side: final, best and mean accuracy, variance, replay memory, time.

Reads the ``metrics.json`` that every run writes to its output folder, so runs made by the CLI,
by ``dfkd_fast.distill`` or on another machine compare alike.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import torch

from dfkd_fast.distill.report import plot_curves, robustness
from dfkd_fast.io import atomic_write_json

COLUMNS = ("final", "best", "mean", "variance", "final - best", "first step at 95%",
           "replay memory", "wall time", "student img/s", "drawn per source")  # fmt: skip
REQUIRED_KEYS = frozenset({"config", "curve", "finished", "step"})


@dataclasses.dataclass
class Comparison:
    runs: dict[str, dict]  # label -> the run's metrics.json
    left_out: dict[str, str]  # folder -> why it is not in the comparison

    def rows(self) -> list[list[str]]:
        return [summary_row(label, metrics) for label, metrics in self.runs.items()]

    def markdown(self) -> str:
        lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"machine": machine_description(), "runs": self.runs})

    def plot(self, path: Path, title: str = "student accuracy") -> bool:
        """The runs' accuracy curves in one PNG; False when matplotlib is missing."""
        path.parent.mkdir(parents=True, exist_ok=True)
        curves = {label: metrics["curve"] for label, metrics in self.runs.items()}
        return plot_curves(path, curves, title)


def machine_description() -> dict:
    description = {"python": platform.python_version(), "torch": torch.__version__,
                   "cpu": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name()
    return description


def read_metrics(folder: Path) -> dict:
    """A run folder's metrics.json; ValueError naming the folder when it has none or it is bad."""
    path = Path(folder) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder}: no metrics.json, not the output folder of a run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(metrics, dict) or not REQUIRED_KEYS <= metrics.keys():
        raise ValueError(f"{path}: not a run's metrics (needs {', '.join(sorted(REQUIRED_KEYS))})")
    return metrics


def compare_runs(folders: list[Path], include_unfinished: bool = False) -> Comparison:
    """Reads each run folder; unfinished runs are left out unless ``include_unfinished``, and
    then labelled with the step they reached."""
    if not folders:
        raise ValueError("folders: give at least one run folder")
    names = [Path(folder).name for folder in folders]
    runs, left_out = {}, {}
    for folder, name in zip(folders, names):
        metrics = read_metrics(folder)
        label = name if names.count(name) == 1 else str(folder)
        if not metrics["finished"]:
            progress = f"step {metrics['step']} of {metrics['config'].get('steps', '?')}"
            if not include_unfinished:
                left_out[str(folder)] = f"unfinished ({progress})"
                continue
            label = f"{label} (unfinished, {progress})"
        runs[label] = metrics
    return Comparison(runs, left_out)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def summary_row(label: str, metrics: dict) -> list[str]:
    """One table row; a run evaluated on no test data has "-" for its accuracies."""
    numbers = robustness(metrics["curve"])
    drawn = metrics.get("drawn_fraction_per_source", {})
    images_per_second = metrics.get("student_images_per_second")
    seconds = metrics.get("seconds")
    return [
        label,
        _percent(numbers.get("final_accuracy")),
        _percent(numbers.get("best_accuracy")),
        _percent(numbers.get("mean_accuracy")),
        f"{numbers['accuracy_variance']:.2e}" if numbers else "-",
        f"{numbers['final_minus_best']:+.2%}" if numbers else "-",
        str(numbers["first_step_at_accuracy"]["0.95"] or "never") if numbers else "-",
        f"{metrics.get('replay_memory_bytes', 0) / 2**20:.2f} MiB",
        "-" if seconds is None else f"{seconds / 60:.1f} min",
        "-" if images_per_second is None else f"{images_per_second:.0f}",
        ", ".join(f"{name} {share:.1%}" for name, share in drawn.items()) or "-",
    ]
