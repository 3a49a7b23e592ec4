"""Finished runs side by side: final, best and mean accuracy, variance, replay memory, time;
and, grouped by config values (the method, say), each group's mean and spread over its runs.

Reads the ``metrics.json`` that every run writes to its output folder, so runs made by the CLI,
by ``dfkd_fast.distill`` or on another machine compare alike.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from dfkd_fast.distill.report import plot_curve_bands, plot_curves, robustness
from dfkd_fast.io import atomic_write_json
from dfkd_fast.machine import machine_description, machine_label

COLUMNS = ("final", "best", "mean", "variance", "final - best", "class forgetting, mean / largest",
           "first step at 95%", "replay memory", "wall time", "student img/s",
           "drawn per source")  # fmt: skip
GROUP_COLUMNS = ("runs", "final", "best", "mean", "final - best", "largest drop",
                 "class forgetting, mean / largest", "first step at 95%", "replay memory",
                 "wall time")  # fmt: skip
FORGETTING_KEYS = ("class_forgetting", "largest_class_forgetting")
REQUIRED_KEYS = frozenset({"config", "curve", "finished", "step"})
# grouping keys that are not config values: older runs did not record them
RECORDED_KEYS = frozenset({"teacher", "machine"})


@dataclasses.dataclass
class Comparison:
    runs: dict[str, dict]  # label -> the run's metrics.json
    left_out: dict[str, str]  # folder -> why it is not in the comparison

    def rows(self) -> list[list[str]]:
        return [summary_row(label, metrics) for label, metrics in self.runs.items()]

    def markdown(self) -> str:
        return _markdown_table("run", COLUMNS, self.rows())

    def machines_note(self) -> str:
        """Each run's machine, when the runs were not all made on the same one (their times
        then compare only within a machine); empty when they were."""
        machines = {label: run_machine(metrics) for label, metrics in self.runs.items()}
        distinct = set(machines.values())
        if len(distinct) < 2:
            return ""
        recorded = len(distinct - {None})
        unrecorded = " (and some runs recorded none)" if None in distinct else ""
        lines = [f"The runs come from {recorded} machine{'s' if recorded != 1 else ''}"
                 f"{unrecorded}: wall times and images per second compare only within one."]
        lines += [f"- {label}: {machine or 'not recorded'}" for label, machine in machines.items()]
        return "\n".join(lines)

    def groups(self, keys: Sequence[str]) -> dict[str, list[str]]:
        """The runs' labels by their values of ``keys`` (see :func:`grouping_values`:
        "method=pre-dfkd"), groups in the order of their first run; ValueError naming a key that
        a run lacks."""
        if isinstance(keys, str) or not keys:
            raise ValueError(f"keys: give a list of config keys, got {keys!r}")
        groups: dict[str, list[str]] = {}
        for label, metrics in self.runs.items():
            values = grouping_values(metrics)
            missing = [key for key in keys if key not in values]
            if missing and set(missing) <= RECORDED_KEYS:
                raise ValueError(f"group by {missing[0]}: run {label} recorded no {missing[0]} "
                                 "(made before runs recorded theirs)")  # fmt: skip
            if missing:
                raise ValueError(f"group by {', '.join(missing)}: not in the config of run {label}")
            name = ", ".join(f"{key}={values[key]}" for key in keys)
            groups.setdefault(name, []).append(label)
        return groups

    def group_summaries(self, keys: Sequence[str]) -> dict[str, dict]:
        """For each group of :meth:`groups`, its runs and the spread over them (mean, sample
        standard deviation, lowest, highest, count) of each robustness number, the wall time and
        the replay memory; runs without test data add no accuracies. ``differing_config`` names
        the config keys whose values differ between the group's runs (the seed, say)."""
        summaries = {}
        for name, labels in self.groups(keys).items():
            numbers = [robustness(self.runs[label]["curve"]) for label in labels]
            numbers = [run for run in numbers if run]
            reached = [run["first_step_at_accuracy"]["0.95"] for run in numbers]
            configs = [grouping_values(self.runs[label]) for label in labels]
            summaries[name] = {
                "runs": labels,
                "differing_config": differing_keys(configs),
                **{key: spread([run[key] for run in numbers]) for key in (
                    "final_accuracy", "best_accuracy", "mean_accuracy", "final_minus_best",
                    "largest_drop")},  # fmt: skip
                **{key: spread([run.get(key) for run in numbers]) for key in FORGETTING_KEYS},
                "first_step_at_95": spread([step for step in reached if step is not None]),
                "seconds": spread([self.runs[label].get("seconds") for label in labels]),
                "replay_memory_bytes": spread(
                    [self.runs[label].get("replay_memory_bytes", 0) for label in labels]),
            }
        return summaries

    def group_markdown(self, keys: Sequence[str]) -> str:
        return group_table(self.group_summaries(keys))

    def write_json(self, path: Path, group_summaries: dict[str, dict] | None = None) -> None:
        """The runs' metrics and this machine's description; the groups' summaries too, if
        given (:meth:`group_summaries`)."""
        contents = {"machine": machine_description(), "runs": self.runs}
        if group_summaries:
            contents["groups"] = group_summaries
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, contents)

    def plot(self, path: Path, title: str = "student accuracy",
             group_by: Sequence[str] = ()) -> bool:  # fmt: skip
        """The runs' accuracy curves in one PNG, or with ``group_by`` each group's mean curve and
        its range; False when matplotlib is missing."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if group_by:
            groups = {name: [self.runs[label]["curve"] for label in labels]
                      for name, labels in self.groups(group_by).items()}  # fmt: skip
            return plot_curve_bands(path, groups, title)
        curves = {label: metrics["curve"] for label, metrics in self.runs.items()}
        return plot_curves(path, curves, title)


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
        " / ".join(_percent(numbers[key]) for key in FORGETTING_KEYS)
        if "class_forgetting" in numbers else "-",
        str(numbers["first_step_at_accuracy"]["0.95"] or "never") if numbers else "-",
        f"{metrics.get('replay_memory_bytes', 0) / 2**20:.2f} MiB",
        "-" if seconds is None else f"{seconds / 60:.1f} min",
        "-" if images_per_second is None else f"{images_per_second:.0f}",
        ", ".join(f"{name} {share:.1%}" for name, share in drawn.items()) or "-",
    ]


def run_machine(metrics: dict) -> str | None:
    """The machine a run was made on, one line (machines joined by "then" for a run resumed
    on another); None for runs made before runs recorded theirs."""
    machines = metrics.get("machines")
    if not isinstance(machines, list) or not machines:
        return None
    return " then ".join(machine_label(machine) for machine in machines)


def grouping_values(metrics: dict) -> dict:
    """What runs can be grouped by: the config's values and, for runs that recorded them,
    ``teacher`` (its class and the start of its weights' SHA-256) and ``machine``."""
    values = dict(metrics["config"])
    teacher = metrics.get("teacher")
    if isinstance(teacher, dict) and "weights_sha256" in teacher:
        values["teacher"] = f"{teacher.get('class', '?')}:{teacher['weights_sha256'][:12]}"
    machine = run_machine(metrics)
    if machine is not None:
        values["machine"] = machine
    return values


def differing_keys(configs: list[dict]) -> list[str]:
    """The keys, sorted, whose values are not the same in every config (missing counts as one)."""
    keys = {key for config in configs for key in config}
    return sorted(key for key in keys if len({repr(config.get(key)) for config in configs}) > 1)


def spread(values: list) -> dict:
    """Mean, sample standard deviation (None for fewer than two), lowest and highest of the
    values that are not None, and their count; only the count for none."""
    present = [value for value in values if value is not None]
    if not present:
        return {"count": 0}
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "min": min(present),
        "max": max(present),
        "count": len(present),
    }


def _spread_cell(numbers: dict, unit) -> str:
    if not numbers["count"]:
        return "-"
    cell = unit(numbers["mean"])
    if numbers["std"] is None or numbers["min"] == numbers["max"]:
        return cell
    return f"{cell} ± {unit(numbers['std'])}"


def group_row(name: str, summary: dict) -> list[str]:
    """One row of the groups' table: mean ± standard deviation over the group's runs."""
    runs = len(summary["runs"])
    reached = summary["first_step_at_95"]
    first_step = _spread_cell(reached, lambda step: f"{step:.0f}") if reached["count"] else "never"
    if 0 < reached["count"] < summary["final_accuracy"]["count"]:
        first_step += f" ({reached['count']} of {summary['final_accuracy']['count']} runs)"
    return [
        name,
        str(runs),
        *(_spread_cell(summary[key], _percent) for key in (
            "final_accuracy", "best_accuracy", "mean_accuracy", "final_minus_best",
            "largest_drop")),  # fmt: skip
        " / ".join(_spread_cell(summary[key], _percent) for key in FORGETTING_KEYS)
        if summary["class_forgetting"]["count"] else "-",
        first_step if summary["final_accuracy"]["count"] else "-",
        _spread_cell(summary["replay_memory_bytes"], lambda size: f"{size / 2**20:.2f} MiB"),
        _spread_cell(summary["seconds"], lambda seconds: f"{seconds / 60:.1f} min"),
    ]


def group_table(summaries: dict[str, dict]) -> str:
    """The groups' table of :meth:`Comparison.group_summaries`."""
    rows = [group_row(name, summary) for name, summary in summaries.items()]
    return _markdown_table("group", GROUP_COLUMNS, rows)


def _markdown_table(first_column: str, columns: Sequence[str], rows: list[list[str]]) -> str:
    lines = [f"| {first_column} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
