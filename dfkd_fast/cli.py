"""The ``dfkd-fast`` command: parses arguments into configs and calls the library.

    dfkd-fast distill                        # the embedded default: a digits teacher, pre-dfkd
    dfkd-fast distill --teacher T.pt --test-data DIR --method adversarial
    dfkd-fast train-teacher --dataset mnist --data-dir DIR --arch lenet5
    dfkd-fast compare runs/mnist-pre-dfkd runs/mnist-adversarial --plot accuracy.png
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dfkd_fast.data import DATASETS, load_dataset, load_digits
from dfkd_fast.distill import (
    FIELD_HELP,
    METHODS,
    PRESETS,
    DistillConfig,
    RunStopped,
    compare_runs,
    distill,
    preset_config,
)
from dfkd_fast.distill.compare import group_table
from dfkd_fast.devices import available_device
from dfkd_fast.host_memory import retain_freed_host_memory
from dfkd_fast.io import ensure_writable_dir
from dfkd_fast.models import CLASSIFIERS, build_classifier
from dfkd_fast.models.cifar import PRETRAINED_MEAN, PRETRAINED_STD
from dfkd_fast.training import (
    TRAIN_FIELD_HELP,
    ClassifierInfo,
    TrainConfig,
    accuracy,
    classifier_record,
    default_output,
    load_classifier,
    save_classifier,
    train_classifier,
)
from dfkd_fast.unlabeled import Collection

DEFAULT_STUDENTS = {"lenet5": "lenet5_half", "resnet56": "resnet20", "resnet44": "resnet20",
                    "resnet32": "resnet20", "resnet34": "resnet18", "wrn40_2": "wrn16_2",
                    "cnn32": "cnn8"}  # fmt: skip
DATASET_NAMES = (*DATASETS, "digits")


class UsageError(ValueError):
    pass


def _config_arguments(parser: argparse.ArgumentParser, config_type, help_texts: dict,
                      presets: dict | None = None) -> None:  # fmt: skip
    """One --flag per field of a config dataclass, explained by `help_texts`, with its default and
    the value each of `presets` gives it; unset flags stay None (the preset decides)."""
    group = parser.add_argument_group(f"{config_type.__name__} fields")
    for field in dataclasses.fields(config_type):
        flag = "--" + field.name.replace("_", "-")
        preset_values = ", ".join(f"{name} {values[field.name]}"
                                  for name, values in (presets or {}).items()
                                  if field.name in values)  # fmt: skip
        default = f"default {field.default}" + (f"; presets: {preset_values}" if preset_values else "")
        help_text = f"{help_texts[field.name]} ({default})"
        if field.type == "bool":
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)  # fmt: skip
        else:
            choices = METHODS if field.name == "method" else None
            group.add_argument(flag, dest=field.name, type=type(field.default), default=None,
                               choices=choices, metavar=None if choices else field.type.upper(),
                               help=help_text)  # fmt: skip


def _given(arguments: dict, config_type) -> dict:
    names = {field.name for field in dataclasses.fields(config_type)}
    return {name: value for name, value in arguments.items() if name in names and value is not None}


def version_line() -> str:
    """What a bug report needs: the versions, and which compiled kernels this install has."""
    import torch

    import dfkd_fast
    from dfkd_fast._extension import cpu_kernel_target, has_kernel

    target = cpu_kernel_target()
    kernels = [f"cpu ({target})" if device == "cpu" and target else device
               for device in ("cpu", "cuda") if has_kernel("reparameterize", device)]  # fmt: skip
    return (f"dfkd-fast {dfkd_fast.__version__} (torch {torch.__version__}; "
            f"{dfkd_fast.extension_status()}; compiled kernels: {', '.join(kernels) or 'none'})")


def _parser() -> argparse.ArgumentParser:
    # Raw text, so that the --version line is printed unwrapped, whatever the terminal's width.
    parser = argparse.ArgumentParser(prog="dfkd-fast",
                                     description="Fast data-free knowledge distillation.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "distill", help="distill a teacher into a student without data",
        description="Distills a teacher checkpoint into a student from generator samples alone. "
        "Without --teacher, trains (once) a teacher on scikit-learn's bundled digits and "
        "distills that. Writes metrics.json, curve.csv, accuracy.png and class_accuracy.png "
        "(with test data), samples.png, class_shares.png (data-free methods) or scores.png "
        "(unlabeled), checkpoint.pt and student.pt to --output-dir.",
    )  # fmt: skip
    run.add_argument("--teacher", type=Path, help="teacher checkpoint (train-teacher's, or a "
                     "bare state dict with --teacher-arch and --dataset)")  # fmt: skip
    run.add_argument("--teacher-arch", choices=list(CLASSIFIERS))
    run.add_argument("--dataset", choices=DATASET_NAMES, help="the teacher's data set, for a bare "
                     "state dict (its standardisation and number of classes)")  # fmt: skip
    run.add_argument("--student-arch", choices=list(CLASSIFIERS),
                     help="default: the usual student of the teacher's architecture")  # fmt: skip
    run.add_argument("--test-data", type=Path, help="folder of the teacher's test data, "
                     "evaluated for the report only")  # fmt: skip
    run.add_argument("--preset", choices=[p for p in PRESETS if not p.endswith("-unlabeled")],
                     help="defaults for a shipped example (default: the teacher's data set; its "
                     "-unlabeled variant for --method unlabeled)")  # fmt: skip
    run.add_argument("--output-dir", type=Path, help="default: runs/<dataset>-<method>")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir "
                     "(or start it if there is none)")
    run.add_argument("--collection", action="append", metavar="SOURCE", default=[],
                     help="--method unlabeled: a source of unlabeled images, repeatable: "
                     "DATASET:FOLDER (mnist, fashion-mnist, kmnist, cifar10, cifar10-jpeg), an "
                     "IDX/.npz file or image folder, or noise:COUNT; SOURCE@0.01 keeps 1%%")  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _config_arguments(run, DistillConfig, FIELD_HELP, PRESETS)

    teach = commands.add_parser(
        "train-teacher", help="train a teacher on a labelled data set you have",
        description="Supervised training of a classifier on MNIST-style IDX files, CIFAR .npz "
        "files or scikit-learn's digits; saves it with its architecture and standardisation.",
    )  # fmt: skip
    teach.add_argument("--dataset", choices=DATASET_NAMES, required=True)
    teach.add_argument("--data-dir", type=Path, help="the data set's folder (not for digits)")
    teach.add_argument("--arch", choices=list(CLASSIFIERS), required=True)
    teach.add_argument("--output", type=Path, help="default: teachers/<dataset>-<arch>.pt")
    teach.add_argument("--resume", action="store_true",
                       help="continue a training that was stopped, from <output>.checkpoint.pt")
    teach.add_argument("--quiet", action="store_true", help="no progress bar")
    _config_arguments(teach, TrainConfig, TRAIN_FIELD_HELP)

    compare = commands.add_parser(
        "compare", help="put finished runs side by side",
        description="Reads the metrics.json of each run folder and prints one Markdown table: "
        "final, best and mean test accuracy, variance, final minus best, first step at 95%, "
        "replay memory, wall time, student images per second. Unfinished runs are left out "
        "unless --include-unfinished. With --group-by, a second table: the runs grouped by "
        "config values, each group's mean and standard deviation over its runs.",
    )  # fmt: skip
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run's output folder")
    compare.add_argument("--json", type=Path, help="also write the runs' metrics and this "
                         "machine's description here")  # fmt: skip
    compare.add_argument("--plot", type=Path, help="also draw the accuracy curves here (PNG)")
    compare.add_argument("--title", default="student accuracy", help="the plot's title")
    compare.add_argument("--include-unfinished", action="store_true",
                         help="compare unfinished runs too, labelled with the step reached")
    compare.add_argument("--group-by", action="append", metavar="KEY",
                         help="also summarise the runs that share this config value (repeat for "
                         "several keys; `teacher` groups by the teacher's weights, `machine` "
                         "by the machine each run was made on), e.g. "
                         "--group-by method for several seeds of each "
                         "method; --json then holds the groups' summaries too, and --plot draws "
                         "each group's mean curve with the range of its runs")  # fmt: skip
    return parser


def _load_split(dataset: str, folder: Path | None, split: str, arch: str):
    if dataset == "digits":
        return load_digits(split)
    if folder is None:
        raise UsageError(f"--data-dir (or --test-data) is needed for {dataset}")
    return load_dataset(dataset, folder, split, image_size=CLASSIFIERS[arch][1])


def train_teacher_command(arguments: dict) -> int:
    config = TrainConfig(**_given(arguments, TrainConfig))
    available_device(config.device, "--device")
    dataset, arch = arguments["dataset"], arguments["arch"]
    train = _load_split(dataset, arguments["data_dir"], "train", arch)
    test = _load_split(dataset, arguments["data_dir"], "test", arch)
    output = arguments["output"] or default_output(arch, dataset)
    checkpoint = output.with_suffix(".checkpoint.pt")
    if arguments["resume"] and output.exists() and not checkpoint.exists():
        print(f"{output} exists and no training of it is under way: nothing to resume (without "
              "--resume it is trained again)")  # fmt: skip
        return 0
    ensure_writable_dir(output.parent)
    model = build_classifier(arch, train.num_classes, train.image_shape[0], seed=config.seed)
    train_classifier(model, train, test, config, progress=not arguments["quiet"],
                     checkpoint=checkpoint, resume=arguments["resume"])  # fmt: skip
    info = ClassifierInfo(arch, train.num_classes, train.image_shape, train.mean, train.std,
                          dataset, accuracy(model, test, device=config.device))  # fmt: skip
    save_classifier(output, model, info)
    checkpoint.unlink(missing_ok=True)
    print(f"teacher {arch} on {dataset}: {info.test_accuracy:.2%} test accuracy; saved {output}")
    return 0


def _teacher(arguments: dict):
    """(teacher, info, test set or None, default output name)."""
    if arguments["teacher"] is None:
        from dfkd_fast.examples import digits_teacher

        misplaced = [flag for flag in ("test_data", "teacher_arch", "dataset") if arguments[flag]]
        if misplaced:
            flags = ", ".join("--" + flag.replace("_", "-") for flag in misplaced)
            raise UsageError(f"{flags}: only with --teacher (without it, the digits teacher is "
                             "evaluated on the held-out digits)")  # fmt: skip
        path = ensure_writable_dir(arguments["output_dir"] or "runs") / "digits-teacher.pt"
        teacher, info, test = digits_teacher(path, progress=not arguments["quiet"])
        print(f"teacher: {info.arch} on the digits, {info.test_accuracy:.2%} test accuracy ({path})")
        return teacher, info, test
    given = None
    if arguments["teacher_arch"] is not None:
        dataset = arguments["dataset"]
        if dataset is None:
            raise UsageError("--teacher-arch needs --dataset (the teacher's standardisation)")
        mean, std = DATASETS[dataset][2:4] if dataset in DATASETS else ((0.5,), (0.25,))
        if arguments["teacher_arch"].startswith(("resnet", "wrn")) and dataset.startswith("cifar"):
            mean, std = PRETRAINED_MEAN, PRETRAINED_STD
        size = CLASSIFIERS[arguments["teacher_arch"]][1] or (32 if len(mean) == 3 else 28)
        given = ClassifierInfo(arguments["teacher_arch"], 10, (len(mean), size, size), mean, std,
                               dataset)  # fmt: skip
    teacher, info = load_classifier(arguments["teacher"], given)
    if given is not None and (given.arch, given.dataset) != (info.arch, info.dataset):
        raise UsageError(f"--teacher-arch and --dataset are for a bare state dict; "
                         f"{arguments['teacher']} records its own: {info.arch} on {info.dataset}")  # fmt: skip
    test = None
    if arguments["test_data"] is not None:
        test = _load_split(info.dataset, arguments["test_data"], "test", info.arch)
    return teacher, info, test


def distill_command(arguments: dict) -> int:
    given = DistillConfig(**_given(arguments, DistillConfig))  # bad values fail before any work
    available_device(given.device, "--device")
    if given.method == "unlabeled" and not arguments["collection"]:
        raise UsageError("--method unlabeled needs at least one --collection source")
    if given.method != "unlabeled" and arguments["collection"]:
        raise UsageError("--collection is for --method unlabeled")
    teacher, info, test = _teacher(arguments)
    preset = arguments["preset"] or (info.dataset if info.dataset in PRESETS else None)
    config = preset_config(preset, **_given(arguments, DistillConfig))
    student_arch = arguments["student_arch"] or DEFAULT_STUDENTS.get(info.arch)
    if student_arch is None:
        raise UsageError(f"no default student for a {info.arch} teacher: give --student-arch")
    student = build_classifier(student_arch, info.num_classes, info.image_shape[0],
                               seed=config.seed)  # fmt: skip
    output_dir = arguments["output_dir"] or Path("runs") / f"{info.dataset or 'run'}-{given.method}"
    collection = None
    if config.method == "unlabeled":
        collection = Collection.from_specs(arguments["collection"], info.image_shape, info.mean,
                                           info.std)  # fmt: skip
    student_info = dataclasses.replace(info, arch=student_arch, test_accuracy=float("nan"))
    record = {"classifier": classifier_record(student_info)}
    result = distill(teacher, student, config, info.image_shape, test_set=test,
                     output_dir=output_dir, resume=arguments["resume"], image_mean=info.mean,
                     image_std=info.std, student_record=record,
                     progress=not arguments["quiet"], collection=collection)  # fmt: skip
    numbers = result.metrics["robustness"]
    if numbers:
        print(f"student: {student_arch}, final {numbers['final_accuracy']:.2%} test accuracy "
              f"(best {numbers['best_accuracy']:.2%}, mean over the run "
              f"{numbers['mean_accuracy']:.2%}), {result.metrics['seconds']:.0f} s")  # fmt: skip
    if "class_forgetting" in numbers:
        most = numbers["most_forgotten_class"]
        print(f"forgetting per class (its best accuracy before the end minus its final): mean "
              f"{numbers['class_forgetting']:.2%}, largest "
              f"{numbers['largest_class_forgetting']:.2%}"
              + ("" if most is None else f" (class {most})"))  # fmt: skip
    if "drawn_fraction_per_source" in result.metrics:
        drawn = ", ".join(f"{name} {share:.1%}" for name, share in
                          result.metrics["drawn_fraction_per_source"].items())  # fmt: skip
        print(f"samples drawn per source: {drawn}")
    shares = result.curve[-1].get("synthetic_class_shares") if result.curve else None
    if shares:
        print(f"the teacher's classes of the last synthetic samples: {min(shares):.1%} (class "
              f"{shares.index(min(shares))}) to {max(shares):.1%} (class "
              f"{shares.index(max(shares))}) each")  # fmt: skip
    files = ", ".join(["metrics.json", "curve.csv", *result.plots, "student.pt"])
    missing = "" if result.plots else "; no plots without matplotlib: pip install matplotlib"
    print(f"report: {output_dir}/ ({files}){missing}")
    return 0


def compare_command(arguments: dict) -> int:
    comparison = compare_runs(arguments["runs"], arguments["include_unfinished"])
    for folder, why in comparison.left_out.items():
        print(f"{folder}: left out, {why}", file=sys.stderr)
    if not comparison.runs:
        raise UsageError("no finished run to compare (--include-unfinished compares the others)")
    print(comparison.markdown())
    machines_note = comparison.machines_note()
    if machines_note:
        print(f"\n{machines_note}")
    group_by = arguments["group_by"] or ()
    summaries = comparison.group_summaries(group_by) if group_by else None
    if summaries:
        print()
        print(group_table(summaries))
        for name, summary in summaries.items():
            if summary["differing_config"]:
                print(f"{name}: its runs differ in {', '.join(summary['differing_config'])}",
                      file=sys.stderr)
    if arguments["json"]:
        comparison.write_json(arguments["json"], summaries)
        print(f"metrics: {arguments['json']}")
    if arguments["plot"]:
        if not comparison.plot(arguments["plot"], arguments["title"], group_by):
            raise UsageError("--plot needs matplotlib (pip install matplotlib)")
        print(f"plot: {arguments['plot']}")
    return 0


COMMANDS = {"distill": distill_command, "train-teacher": train_teacher_command,
            "compare": compare_command}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    arguments = vars(_parser().parse_args(argv))
    command = arguments.pop("command")
    retain_freed_host_memory()
    run = COMMANDS[command]
    try:
        return run(arguments)
    except (ValueError, FileNotFoundError) as error:
        print(f"dfkd-fast {command}: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        print(f"dfkd-fast {command}: {stopped}; the same command with --resume continues it",
              file=sys.stderr)  # fmt: skip
        return stopped.exit_code
    except KeyboardInterrupt:
        print(f"dfkd-fast {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
