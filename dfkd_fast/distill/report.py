"""What a run reports: the accuracy curve and its robustness statistics (PRE-DFKD's point: an
accuracy that rises steadily makes the last snapshot good without validation data), the replay
memory, the timing; written as metrics.json and curve.csv, and plotted as PNGs."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import torch

from dfkd_fast.distill.streams import SAMPLE_GRID_STREAM, stream_seed
from dfkd_fast.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from dfkd_fast.models import weights_sha256
from dfkd_fast.ops.reparameterize import sample_prior


ACCURACY_LEVELS = (0.5, 0.9, 0.95, 0.98)


def robustness(curve: list[dict]) -> dict:
    """Final, best, mean (the expected accuracy of a snapshot taken at a random evaluation) and
    variance of the accuracy curve, final minus best, and the largest drop between evaluations."""
    accuracies = [entry["accuracy"] for entry in curve if "accuracy" in entry]
    if not accuracies:
        return {}
    drops = [before - after for before, after in zip(accuracies, accuracies[1:])]
    first_step_at = {
        f"{level:.2f}": next((e["step"] for e in curve if e.get("accuracy", 0) >= level), None)
        for level in ACCURACY_LEVELS
    }
    return {
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "mean_accuracy": statistics.fmean(accuracies),
        "accuracy_variance": statistics.pvariance(accuracies),
        "final_minus_best": accuracies[-1] - max(accuracies),
        "largest_drop": max([0.0, *drops]),
        "evaluations": len(accuracies),
        "first_step_at_accuracy": first_step_at,
        **class_forgetting(curve),
    }


def class_forgetting(curve: list[dict]) -> dict:
    """What the student forgot of each class, from the per-class test accuracies of at least
    two evaluations: a class's forgetting is its best accuracy before the last evaluation minus
    its last accuracy, or 0 (Chaudhry et al., 2018); ``class_forgetting`` is the mean over the
    classes, ``largest_class_forgetting`` the largest, ``most_forgotten_class`` that class (None
    when none forgot), and ``largest_class_drop`` the largest fall of one class's accuracy
    between two evaluations, recovered later or not. Classes without test images are left out."""
    rows = [entry["class_accuracy"] for entry in curve if "class_accuracy" in entry]
    if len(rows) < 2:
        return {}
    forgetting, drops = {}, [0.0]
    for label, column in enumerate(zip(*rows)):
        if None in column:
            continue
        forgetting[label] = max(0.0, max(column[:-1]) - column[-1])
        drops += [before - after for before, after in zip(column, column[1:])]
    if not forgetting:
        return {}
    most_forgotten = max(forgetting, key=forgetting.get)
    return {  # to the 5 digits of the class accuracies, without the subtractions' float noise
        "class_forgetting": round(statistics.fmean(forgetting.values()), 5),
        "largest_class_forgetting": round(forgetting[most_forgotten], 5),
        "most_forgotten_class": most_forgotten if forgetting[most_forgotten] > 0 else None,
        "largest_class_drop": round(max(drops), 5),
    }


def describe_network(network: torch.nn.Module) -> dict:
    """The network's class, parameter count and :func:`~dfkd_fast.models.weights_sha256`: which
    teacher a run distilled."""
    return {
        "class": type(network).__name__,
        "parameters": sum(parameter.numel() for parameter in network.parameters()),
        "weights_sha256": weights_sha256(network),
    }


def metrics(config, curve, replay_bytes: int, seconds: float, train_seconds: float,
            step: int, finished: bool) -> dict:  # fmt: skip
    student_images = step * config.student_steps * config.batch_size
    return {
        "config": config.to_dict(),
        "finished": finished,
        "step": step,
        "curve": curve,
        "robustness": robustness(curve),
        "replay_memory_bytes": replay_bytes,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "student_images_per_second": student_images / train_seconds if train_seconds else math.nan,
        "steps_per_second": step / train_seconds if train_seconds else math.nan,
    }


def _csv_row(entry: dict) -> dict:
    """`entry` with each list spread over columns key_0, key_1, ..."""
    row = {}
    for key, value in entry.items():
        if isinstance(value, list):
            row.update({f"{key}_{index}": item for index, item in enumerate(value)})
        else:
            row[key] = value
    return row


def curve_csv(curve: list[dict]) -> str:
    rows = [_csv_row(entry) for entry in curve]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write(directory: Path, run_metrics: dict, curve: list[dict]) -> None:
    atomic_write_json(directory / "metrics.json", run_metrics)
    atomic_write_text(directory / "curve.csv", curve_csv(curve))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return None
    return pyplot


def _save_figure(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


LEGEND_INSIDE_MAX_LINES = 3


def _accuracy_points(curve: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["accuracy"] for entry in curve if "accuracy" in entry}


def _save_accuracy_figure(pyplot, figure, axes, path: Path, title: str) -> None:
    axes.set(xlabel="step", ylabel="student test accuracy", title=title)
    axes.grid(alpha=0.3)
    if len(axes.lines) > LEGEND_INSIDE_MAX_LINES:  # beside the axes, not over the curves
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    elif axes.lines:  # a run without test data has no accuracy to draw
        axes.legend()
    _save_figure(figure, path)
    pyplot.close(figure)


def plot_curves(path: Path, curves: dict[str, list[dict]], title: str) -> bool:
    """Accuracy against step, one line per run; False when matplotlib is missing."""
    pyplot = _pyplot()
    if pyplot is None:
        return False
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        points = _accuracy_points(curve)
        if points:
            axes.plot(list(points), list(points.values()), marker=".", label=label)
    _save_accuracy_figure(pyplot, figure, axes, path, title)
    return True


def curve_band(curves: list[list[dict]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps that every curve with accuracies evaluated, and at each the mean, lowest and highest
    accuracy of those curves."""
    points = [run for run in map(_accuracy_points, curves) if run]
    steps = sorted(set.intersection(*(set(run) for run in points))) if points else []
    values = [[run[step] for run in points] for step in steps]
    means = [statistics.fmean(at) for at in values]
    return steps, means, [min(at) for at in values], [max(at) for at in values]


def plot_curve_bands(path: Path, groups: dict[str, list[list[dict]]], title: str) -> bool:
    """Accuracy against step, one line per group of runs: its :func:`curve_band`, the mean drawn
    and the range shaded; False when matplotlib is missing."""
    pyplot = _pyplot()
    if pyplot is None:
        return False
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for label, curves in groups.items():
        steps, means, lows, highs = curve_band(curves)
        if steps:
            runs = sum(1 for curve in curves if _accuracy_points(curve))
            line = axes.plot(steps, means, label=f"{label} ({runs} run{'s' * (runs > 1)})")[0]
            axes.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
    _save_accuracy_figure(pyplot, figure, axes, path, title)
    return True


CLASS_LEGEND_MAX_CLASSES = 20


def _per_class_figure(curve: list[dict], key: str):
    """For the curve entries that hold a per-class list under `key`: pyplot, a figure and its
    axes, the steps, one tuple of values per class and one colour per class; None when
    matplotlib is missing or no entry holds `key`."""
    points = [(entry["step"], entry[key]) for entry in curve if key in entry]
    pyplot = _pyplot()
    if pyplot is None or not points:
        return None
    steps, rows = zip(*points)
    per_class = list(zip(*rows))
    figure, axes = pyplot.subplots(figsize=(6, 4))
    palette = pyplot.get_cmap("tab20" if len(per_class) > 10 else "tab10").colors
    colours = [palette[k % len(palette)] for k in range(len(per_class))]
    return pyplot, figure, axes, steps, per_class, colours


def _save_per_class_figure(pyplot, figure, axes, path: Path, classes: int, top_first: bool):
    if classes <= CLASS_LEGEND_MAX_CLASSES:
        handles, labels = axes.get_legend_handles_labels()
        if top_first:
            handles, labels = handles[::-1], labels[::-1]
        axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    fontsize="small", title="class")  # fmt: skip
    _save_figure(figure, path)
    pyplot.close(figure)


def plot_class_shares(path: Path, curve: list[dict]) -> bool:
    """The teacher's predicted classes of the synthetic samples over the run, stacked: a class
    whose band thins out is one the generator has stopped making. False when matplotlib is
    missing or the curve holds no shares."""
    figure_parts = _per_class_figure(curve, "synthetic_class_shares")
    if figure_parts is None:
        return False
    pyplot, figure, axes, steps, per_class, colours = figure_parts
    axes.stackplot(steps, per_class, labels=[str(k) for k in range(len(per_class))],
                   colors=colours)  # fmt: skip
    axes.margins(x=0)
    axes.set(xlabel="step", ylabel="share of the generator's samples", ylim=(0, 1),
             title="the teacher's classes of the synthetic samples")  # fmt: skip
    _save_per_class_figure(pyplot, figure, axes, path, len(per_class), top_first=True)
    return True


def plot_class_accuracy(path: Path, curve: list[dict]) -> bool:
    """The student's test accuracy on each class over the run, one line per class: a line that
    falls while the others hold is a class being forgotten. False when matplotlib is missing or
    the curve holds no per-class accuracies."""
    figure_parts = _per_class_figure(curve, "class_accuracy")
    if figure_parts is None:
        return False
    pyplot, figure, axes, steps, per_class, colours = figure_parts
    for label, values in enumerate(per_class):
        if None not in values:  # a class without test images
            axes.plot(steps, values, color=colours[label], label=str(label), linewidth=1)
    axes.set(xlabel="step", ylabel="student test accuracy on the class",
             title="the student's accuracy per class")  # fmt: skip
    axes.grid(alpha=0.3)
    _save_per_class_figure(pyplot, figure, axes, path, len(per_class), top_first=False)
    return True


def _grid(images: torch.Tensor, mean, std, columns: int) -> torch.Tensor:
    """(N, C, H, W) standardised images -> one (H', W', C) array in [0, 1] for imshow."""
    images = images.detach().float().cpu()
    if mean is not None and std is not None:
        channels = images.shape[1]
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).expand(1, channels, 1, 1)
        std_t = torch.tensor(std).view(1, -1, 1, 1).expand(1, channels, 1, 1)
        images = (images * std_t + mean_t).clamp(0, 1)
    else:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (high - low).clamp_min(1e-8)
    count, channels, height, width = images.shape
    rows = math.ceil(count / columns)
    canvas = torch.ones(channels, rows * (height + 1), columns * (width + 1))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + 1), column * (width + 1)
        canvas[:, top : top + height, left : left + width] = image
    return canvas.permute(1, 2, 0).squeeze(-1)


def plot_samples(path: Path, panels: dict[str, torch.Tensor], mean, std) -> bool:
    pyplot = _pyplot()
    if pyplot is None:
        return False
    figure, axes = pyplot.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for axis, (title, images) in zip(axes[0], panels.items()):
        axis.imshow(_grid(images, mean, std, columns=8).numpy(), cmap="gray", vmin=0, vmax=1)
        axis.set_title(title)
        axis.axis("off")
    _save_figure(figure, path)
    pyplot.close(figure)
    return True


def plot_score_histograms(path: Path, scores: torch.Tensor, source_index: torch.Tensor,
                          names: list[str], score: str) -> bool:  # fmt: skip
    pyplot = _pyplot()
    if pyplot is None:
        return False
    figure, axes = pyplot.subplots(figsize=(6, 4))
    finite = scores[torch.isfinite(scores)]
    bins = torch.linspace(float(finite.min()), float(finite.max()), 60).tolist()
    for source_id, name in enumerate(names):
        values = scores[source_index == source_id]
        axes.hist(values.tolist(), bins=bins, alpha=0.5, density=True, label=name)
    axes.set(xlabel=f"{score} score (higher: more related)", ylabel="density",
             title="relatedness to the teacher's task, per source")  # fmt: skip
    axes.legend()
    _save_figure(figure, path)
    pyplot.close(figure)
    return True


@torch.no_grad()
def plot(directory: Path, curve: list[dict], method: str, run, mean, std, scored=None):
    """accuracy.png and class_accuracy.png (with test data); samples.png (synthetic and, for
    the replay methods, replayed images; for the unlabeled method, the most and least related
    samples); class_shares.png (data-free); scores.png (unlabeled). Returns the names of the
    files written, none without matplotlib."""
    if _pyplot() is None:  # nothing to draw the sample grids with, so none is computed
        return []
    written = []
    if plot_curves(directory / "accuracy.png", {method: curve}, f"{method}: student accuracy"):
        written.append("accuracy.png")
    if plot_class_accuracy(directory / "class_accuracy.png", curve):
        written.append("class_accuracy.png")
    if scored is not None:
        collection = run.collection
        order = scored.scores.argsort(descending=True)
        panels = {"most related": collection.batch(order[:32]),
                  "least related": collection.batch(order[-32:])}  # fmt: skip
        if plot_samples(directory / "samples.png", panels, mean, std):
            written.append("samples.png")
        if plot_score_histograms(directory / "scores.png", scored.scores, collection.source_index,
                                 collection.source_names, scored.score):  # fmt: skip
            written.append("scores.png")
        return written
    seed = stream_seed(run.config.seed, SAMPLE_GRID_STREAM)
    rng = torch.Generator(run.device).manual_seed(seed)
    latent = sample_prior(32, run.config.latent_dim, generator=rng, device=run.device)
    panels = {"synthetic (generator)": run.generator(latent)}
    if run.replay is not None:
        panels[f"replay ({method})"] = run.replay.sample(32, rng)
    if plot_samples(directory / "samples.png", panels, mean, std):
        written.append("samples.png")
    if plot_class_shares(directory / "class_shares.png", curve):
        written.append("class_shares.png")
    return written
