"""The distillation engine: builds a run from a teacher, a student and a config, steps it with the
method's step function, evaluates on held-out data for reporting only, checkpoints atomically and
resumes a killed run to the same result.

    result = distill(teacher, student, DistillConfig(method="pre-dfkd"), image_shape=(1, 32, 32),
                     test_set=mnist_test, output_dir="runs/mnist")
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dfkd_fast.backend import cpu_has_bfloat16_instructions
from dfkd_fast.data import ImageSet
from dfkd_fast.devices import available_device
from dfkd_fast.distill import report
from dfkd_fast.distill.averaging import WeightAverage
from dfkd_fast.distill.config import DistillConfig
from dfkd_fast.distill.replay import GenerativeReplay, MemoryBank
from dfkd_fast.distill.steps import STEP_FUNCTIONS, generator_step
from dfkd_fast.distill.streams import REPLAY_STREAM, SAMPLER_STREAM, stream_seed
from dfkd_fast.hooks import BNStatHooks, PenultimateFeatures, batchnorm_layers
from dfkd_fast.io import atomic_torch_save, ensure_writable_dir, load_checkpoint
from dfkd_fast.machine import machine_description
from dfkd_fast.models.generator import Generator, check_image_shape
from dfkd_fast.stopping import RunStopped, deferred_stop_signals
from dfkd_fast.training import accuracy, correct_per_class
from dfkd_fast.unlabeled.collection import Collection
from dfkd_fast.unlabeled.sampling import RelatednessSampler
from dfkd_fast.unlabeled.scores import score_collection

CHECKPOINT_NAME = "checkpoint.pt"
STUDENT_NAME = "student.pt"


@dataclass
class DistillResult:
    student: nn.Module
    metrics: dict  # what metrics.json holds: config, curve, robustness, memory, timing
    output_dir: Path | None
    curve: list[dict] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # the PNG files written to output_dir

    @property
    def final_accuracy(self) -> float:
        return self.metrics["robustness"].get("final_accuracy", math.nan)


class Run:
    """Everything a step touches: the networks, their optimizers, the replay memory, the random
    generators. Built from the config alone (plus the user's teacher and student), so that a
    checkpoint of its state dicts restores it exactly.

    The replay memory draws from a random stream of its own (`replay_rng`), so that the data-free
    methods see the same synthetic samples until replay starts and differ only in what they
    replay from then on."""

    def __init__(self, teacher, student, config: DistillConfig, image_shape, bn_layers: bool,
                 collection=None, scored=None):  # fmt: skip
        self.config = config
        self.device = torch.device(config.device)
        self.image_shape = image_shape
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.memory_format = memory_format
        self.use_amp = config.cpu_amp if self.device.type == "cpu" else (
            config.amp and self.device.type == "cuda")
        self.teacher = teacher.to(self.device, memory_format=memory_format).eval()
        self.teacher.requires_grad_(False)
        self.student = student.to(self.device, memory_format=memory_format).train()
        self.student_average = None
        if config.student_ema > 0:
            self.student_average = WeightAverage(self.student, config.student_ema)
        self.rng = torch.Generator(self.device).manual_seed(config.seed)
        self.replay_rng = None
        self.generator = self.generator_optimizer = self.replay = self.bn_hooks = None
        self.feature_hooks = None
        if config.data_free:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(config.seed)
                self.generator = Generator(config.latent_dim, image_shape, config.generator_width)
                self.generator.to(self.device, memory_format=memory_format).train()
                self.replay = self._build_replay()
            if self.replay is not None:
                self.replay_rng = torch.Generator(self.device).manual_seed(
                    stream_seed(config.seed, REPLAY_STREAM))
            self.generator_optimizer = torch.optim.Adam(
                self.generator.parameters(), lr=config.generator_lr, betas=(0.5, 0.999)
            )
            if bn_layers and config.bn_weight > 0:
                self.bn_hooks = BNStatHooks(self.teacher, first_layer_weight=config.first_bn_multiplier,
                                            momentum=config.bn_momentum)  # fmt: skip
            if config.activation_weight > 0:
                self.feature_hooks = PenultimateFeatures(self.teacher)
        else:
            if collection is None or scored is None:
                raise ValueError(f"method {config.method!r} needs a collection")
            self.collection = collection
            self.sampler = RelatednessSampler(
                scored.scores, scored.predictions, config.policy, config.policy_temperature,
                config.top_fraction, config.class_balance, config.disagreement_weight,
                config.uniform_share, self.device,
            )  # fmt: skip
            self.cpu_rng = torch.Generator().manual_seed(stream_seed(config.seed, SAMPLER_STREAM))
            self.drawn_per_source = torch.zeros(len(collection.sources), dtype=torch.long)
        self.student_optimizer = torch.optim.SGD(
            self.student.parameters(), lr=config.student_lr, momentum=0.9,
            weight_decay=config.student_weight_decay,
        )  # fmt: skip
        self.student_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.student_optimizer, T_max=config.steps
        )
        self.step_function = STEP_FUNCTIONS[config.method]

    def _build_replay(self):
        config = self.config
        if config.method == "pre-dfkd":
            return GenerativeReplay(
                self.image_shape, config.vae_latent_dim, config.vae_width, config.vae_lr,
                config.vae_output_weight, config.vae_kl_weight, config.vae_self_replay,
                self.device, config.vae_batch_size, self.autocast, self.memory_format,
                config.vae_fitted_prior, config.vae_prior_decay, config.vae_snapshot_every,
            )  # fmt: skip
        if config.method == "memory-bank":
            return MemoryBank(self.image_shape, config.memory_bank_size, self.device)
        return None

    def autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def bn_matching(self):
        return self.bn_hooks if self.bn_hooks is not None else contextlib.nullcontext()

    def penultimate_features(self):
        return self.feature_hooks if self.feature_hooks is not None else contextlib.nullcontext()

    def phase(self, name: str):
        """Marks a part of a step for torch.profiler (`generator update`, `replay update`,
        `student batches`, `student update`, `sampler refresh`); benchmarks/profile_step.py
        times each part."""
        return torch.profiler.record_function(f"dfkd_fast.{name}")

    def kept_student(self) -> nn.Module:
        """The student evaluated and returned: the weight average, or the trained weights."""
        return self.student if self.student_average is None else self.student_average.network

    def drawn_fractions(self) -> dict[str, float]:
        """unlabeled: the fraction of drawn samples that came from each source."""
        if self.generator is not None:
            return {}
        total = max(int(self.drawn_per_source.sum()), 1)
        return {source.name: int(count) / total for source, count in
                zip(self.collection.sources, self.drawn_per_source)}  # fmt: skip

    def replay_memory_bytes(self) -> int:
        return self.replay.memory_bytes() if self.replay is not None else 0

    def state_dict(self) -> dict:
        state = {
            "student": self.student.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            "student_schedule": self.student_schedule.state_dict(),
            "rng": self.rng.get_state(),
        }
        if self.generator is not None:
            state["generator"] = self.generator.state_dict()
            state["generator_optimizer"] = self.generator_optimizer.state_dict()
        else:
            state["sampler"] = self.sampler.state_dict()
            state["cpu_rng"] = self.cpu_rng.get_state()
            state["drawn_per_source"] = self.drawn_per_source
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
            state["replay_rng"] = self.replay_rng.get_state()
        if self.student_average is not None:
            state["student_average"] = self.student_average.state_dict()
        if self.bn_hooks is not None:
            state["bn_ema"] = self.bn_hooks._ema
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.student_schedule.load_state_dict(state["student_schedule"])
        self.rng.set_state(state["rng"])
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
            self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        else:
            self.sampler.load_state_dict(state["sampler"])
            self.cpu_rng.set_state(state["cpu_rng"])
            self.drawn_per_source = state["drawn_per_source"].clone()
        if self.replay is not None:
            if "replay_rng" not in state:
                raise ValueError(
                    "the checkpoint was written by an earlier dfkd_fast, whose replay shared the "
                    "run's random stream: it cannot be resumed to the same result; start a new run"
                )
            self.replay.load_state_dict(state["replay"])
            self.replay_rng.set_state(state["replay_rng"])
        if self.student_average is not None:
            self.student_average.load_state_dict(state["student_average"])
        if self.bn_hooks is not None and "bn_ema" in state:
            self.bn_hooks._ema = [
                None if ema is None else tuple(t.to(self.device) for t in ema)
                for ema in state["bn_ema"]
            ]


def check_networks(teacher, student, image_shape) -> int:
    """The number of classes, after checking that teacher and student take `image_shape` and
    agree on it."""
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise TypeError("teacher and student must be nn.Module instances")
    image_shape = check_image_shape(tuple(image_shape))
    probe = torch.zeros(2, *image_shape)
    sizes = {}
    for name, network in (("teacher", teacher), ("student", student)):
        was_training = network.training
        device = next(network.parameters()).device
        try:
            with torch.no_grad():
                logits = network.eval()(probe.to(device))
        except Exception as error:
            raise ValueError(f"the {name} cannot take images of shape {image_shape}: {error}") from None
        finally:
            network.train(was_training)
        if logits.dim() != 2:
            raise ValueError(f"the {name} must return (batch, classes) logits, got {tuple(logits.shape)}")
        sizes[name] = logits.shape[1]
    if sizes["teacher"] != sizes["student"]:
        raise ValueError(
            f"teacher and student disagree on the number of classes: the teacher outputs "
            f"{sizes['teacher']}, the student {sizes['student']}"
        )
    return sizes["teacher"]


def _check_test_set(test_set, image_shape, num_classes: int) -> None:
    if not isinstance(test_set, ImageSet):
        raise TypeError(f"test_set must be a dfkd_fast.data.ImageSet, got {type(test_set).__name__}")
    if len(test_set) == 0:
        raise ValueError("test_set holds no images")
    if test_set.num_classes != num_classes:
        raise ValueError(f"test_set has {test_set.num_classes} classes, the teacher {num_classes}")
    if test_set.image_shape != image_shape:
        raise ValueError(f"test_set holds images of shape {test_set.image_shape}, the teacher "
                         f"takes {image_shape}")  # fmt: skip


def _check_collection(collection, image_shape, config: DistillConfig) -> None:
    if collection is None:
        raise ValueError(f"method {config.method!r} needs a collection of unlabeled samples")
    if not isinstance(collection, Collection):
        raise TypeError(f"collection must be a dfkd_fast.unlabeled.Collection, got "
                        f"{type(collection).__name__}")  # fmt: skip
    if collection.image_shape != image_shape:
        raise ValueError(f"the collection makes images of shape {collection.image_shape}, the "
                         f"teacher takes {image_shape}")  # fmt: skip
    if len(collection) < config.batch_size:
        raise ValueError(f"the collection holds {len(collection)} samples, fewer than a batch "
                         f"({config.batch_size})")  # fmt: skip


def _prepare_output(output_dir, resume: bool, config: DistillConfig):
    """The output folder, checked writable, and the checkpoint to resume from (or None)."""
    if output_dir is None:
        if resume:
            raise ValueError("resume needs the output_dir of the run to continue")
        return None, None
    directory = ensure_writable_dir(output_dir)
    checkpoint_path = directory / CHECKPOINT_NAME
    if not checkpoint_path.exists():
        return directory, None
    if not resume:
        raise ValueError(
            f"{str(directory)!r} already holds a run ({CHECKPOINT_NAME}); resume it, or choose "
            "another output directory"
        )
    checkpoint = load_checkpoint(checkpoint_path)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "run" not in checkpoint:
        raise ValueError(f"{str(checkpoint_path)!r} is not a dfkd-fast distillation checkpoint")
    mismatches = config.resume_mismatches(checkpoint["config"])
    if mismatches:
        detail = ", ".join(f"{name}: {checkpoint['config'][name]!r} -> "
                           f"{getattr(config, name)!r}" for name in mismatches)  # fmt: skip
        raise ValueError(f"cannot resume a run made with another config ({detail})")
    return directory, checkpoint


def distill(
    teacher: nn.Module,
    student: nn.Module,
    config: DistillConfig = DistillConfig(),
    image_shape: tuple[int, int, int] = (1, 32, 32),
    test_set: ImageSet | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
    student_record: dict | None = None,
    progress: bool = True,
    collection=None,
    stop_on_signal: bool = True,
) -> DistillResult:
    """Distills `teacher` into `student` (trained in place) without data.

    Args:
        image_shape: (channels, height, width) of the teacher's (standardised) inputs.
        test_set: held-out data, evaluated every ``config.eval_every`` steps for the report
            only; the returned student is always the last one.
        output_dir: where metrics.json, curve.csv, the plots, checkpoint.pt and student.pt go
            (nothing is written when None). A folder that holds a run is resumed with
            ``resume=True`` and otherwise refused.
        image_mean, image_std: the standardisation of the teacher's inputs, for the sample plots.
        student_record: extra entries for student.pt (a classifier record, see training).
        collection: for ``method="unlabeled"``, the unlabeled samples
            (a :class:`dfkd_fast.unlabeled.Collection` in the teacher's image format); scored by
            ``config.score`` once (cached in output_dir).
        stop_on_signal: with an output_dir, a SIGINT (Ctrl-C) or SIGTERM received during the
            run lets the step under way finish, writes a checkpoint and raises
            :class:`~dfkd_fast.stopping.RunStopped` (a KeyboardInterrupt); a second
            signal acts at once. The process's handlers are restored on return.

    Raises:
        RunStopped: stopped by a signal; ``resume=True`` continues from its step.
    """
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    available_device(config.device, "config.device")
    num_classes = check_networks(teacher, student, image_shape)
    image_shape = tuple(image_shape)
    if test_set is not None:
        _check_test_set(test_set, image_shape, num_classes)
    if not config.data_free:
        _check_collection(collection, image_shape, config)
    elif collection is not None:
        raise ValueError(f"method {config.method!r} is data-free: it takes no collection")
    directory, checkpoint = _prepare_output(output_dir, resume, config)
    has_bn = bool(batchnorm_layers(teacher))
    scored = None
    if not config.data_free:
        scored = score_collection(teacher, collection, config.score, device=config.device,
                                  cache_dir=directory, progress=progress)  # fmt: skip
    elif not has_bn and config.bn_weight > 0:
        warnings.warn(
            "the teacher has no BatchNorm layers: BatchNorm-statistic matching is disabled",
            UserWarning,
            stacklevel=2,
        )
    if (config.cpu_amp and torch.device(config.device).type == "cpu"
            and cpu_has_bfloat16_instructions() is False):  # fmt: skip
        warnings.warn(
            "cpu_amp: this CPU has no bfloat16 instructions, so bfloat16 autocast makes every "
            "step slower, not faster",
            UserWarning,
            stacklevel=2,
        )
    teacher_description = report.describe_network(teacher)
    class_counts = test_set.class_counts.tolist() if test_set is not None else []
    run = Run(teacher, student, config, image_shape, has_bn, collection, scored)
    curve: list[dict] = []
    interval_losses: list[dict] = []  # the losses of the steps since the last evaluation
    first_step, seconds_before, eval_seconds = 1, 0.0, 0.0
    machines = []  # each machine the run has run on, in order: a resumed run may move
    if checkpoint is not None:
        run.load_state_dict(checkpoint["run"])
        curve = list(checkpoint["curve"])
        interval_losses = [{name: loss.to(run.device) for name, loss in losses.items()}
                           for losses in checkpoint.get("interval_losses", [])]  # fmt: skip
        first_step = int(checkpoint["step"]) + 1
        seconds_before = float(checkpoint["seconds"])
        eval_seconds = float(checkpoint["eval_seconds"])
        machines = list(checkpoint.get("machines", []))
    this_machine = machine_description(run.device)
    if not machines or machines[-1] != this_machine:
        machines.append(this_machine)

    def evaluate(step: int, losses: list[dict], seconds: float) -> dict:
        entry = {"step": step, "seconds": round(seconds, 3)}
        if losses:
            for name in losses[0]:
                mean = torch.stack([l[name].float() for l in losses]).mean(dim=0)
                if mean.dim():  # a share per class
                    entry[name] = [round(share, 5) for share in mean.tolist()]
                else:
                    entry[f"{name}_loss"] = mean.item()
        if test_set is not None:
            correct = correct_per_class(run.kept_student(), test_set, device=run.device).cpu()
            entry["accuracy"] = (correct.sum() / len(test_set)).item()
            entry["class_accuracy"] = [None if count == 0 else round(right / count, 5)
                                       for right, count in zip(correct.tolist(), class_counts)]
            if run.student_average is not None:
                entry["trained_weights_accuracy"] = accuracy(run.student, test_set,
                                                             device=run.device)  # fmt: skip
        return entry

    def write_report(step: int, seconds: float, finished: bool) -> dict:
        metrics = report.metrics(config, curve, run.replay_memory_bytes(), seconds,
                                 seconds - eval_seconds, step, finished)  # fmt: skip
        metrics["teacher"] = teacher_description
        metrics["machines"] = machines
        if not config.data_free:
            metrics["drawn_fraction_per_source"] = run.drawn_fractions()
        if directory is not None:
            report.write(directory, metrics, curve)
        return metrics

    def save_checkpoint(step: int) -> None:
        # the checkpoint's step includes its evaluation, if any, so a resumed run repeats nothing
        atomic_torch_save(directory / CHECKPOINT_NAME, {
            "config": config.to_dict(), "run": run.state_dict(), "curve": curve,
            "interval_losses": interval_losses, "step": step, "machines": machines,
            "seconds": seconds_before + time.perf_counter() - started, "eval_seconds": eval_seconds,
        })  # fmt: skip

    started = time.perf_counter()
    bar = tqdm(range(first_step, config.steps + 1), desc=f"distill ({config.method})",
               unit="step", initial=first_step - 1, total=config.steps, disable=not progress)  # fmt: skip
    with deferred_stop_signals(stop_on_signal and directory is not None) as stop_signal:
        if first_step == 1 and config.data_free:
            for _ in tqdm(range(config.generator_warmup), desc="generator warm-up", unit="update",
                          leave=False, disable=not progress):  # fmt: skip
                generator_step(run)
        for step in bar:
            interval_losses.append(run.step_function(run, step))
            if step % config.eval_every == 0 or step == config.steps:
                evaluation_started = time.perf_counter()
                seconds = seconds_before + evaluation_started - started
                curve.append(evaluate(step, interval_losses, seconds))
                interval_losses = []
                eval_seconds += time.perf_counter() - evaluation_started
                if "accuracy" in curve[-1]:
                    bar.set_postfix(accuracy=f"{curve[-1]['accuracy']:.4f}")
                write_report(step, seconds, finished=False)
            stopped_by = stop_signal() if step < config.steps else None
            if directory is not None and (stopped_by or step % config.checkpoint_every == 0
                                          or step == config.steps):  # fmt: skip
                save_checkpoint(step)
            if stopped_by:
                bar.close()
                raise RunStopped(stopped_by, step, config.steps, directory / CHECKPOINT_NAME)
    bar.close()
    if run.student_average is not None:
        run.student.load_state_dict(run.student_average.network.state_dict())
    seconds = seconds_before + time.perf_counter() - started
    metrics = write_report(config.steps, seconds, finished=True)
    plots = []
    if directory is not None:
        atomic_torch_save(directory / STUDENT_NAME, {
            **(student_record or {}), "state_dict": run.student.state_dict(),
            "distill_config": config.to_dict(), "metrics": metrics["robustness"],
        })  # fmt: skip
        plots = report.plot(directory, curve, config.method, run, image_mean, image_std, scored)
    return DistillResult(student=run.student.eval(), metrics=metrics, output_dir=directory,
                         curve=curve, plots=plots)  # fmt: skip
