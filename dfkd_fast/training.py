"""Supervised training of a classifier (the teacher, when its data is still at hand), and the
checkpoint format for classifiers: the weights with what is needed to use them again (the
architecture, the input shape and standardisation, the accuracy), loaded with weights_only=True.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfkd_fast.data import ImageSet
from dfkd_fast.devices import available_device, check_device_name
from dfkd_fast.io import atomic_torch_save, load_checkpoint
from dfkd_fast.models import build_classifier, strip_prefix
from dfkd_fast.stopping import RunStopped, deferred_stop_signals

__all__ = [
    "ClassifierInfo",
    "TrainConfig",
    "accuracy",
    "correct_per_class",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    max_shift: int = 2
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0 or not self.weight_decay >= 0 or self.max_shift < 0:
            raise ValueError("lr must be > 0, weight_decay and max_shift >= 0")
        check_device_name(self.device)


TRAIN_FIELD_HELP = {
    "epochs": "passes over the training set",
    "batch_size": "images per SGD step",
    "lr": "peak SGD learning rate (momentum 0.9, Nesterov; one-cycle schedule)",
    "weight_decay": "SGD weight decay",
    "max_shift": "random translation of the training images, in pixels",
    "seed": "seeds the initial weights, the order of the images and the shifts",
    "device": "cpu, cuda or cuda:N",
}


@dataclass(frozen=True)
class ClassifierInfo:
    """What a classifier checkpoint records besides the weights."""

    arch: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = ""
    test_accuracy: float = math.nan


@torch.no_grad()
def correct_per_class(model: nn.Module, data: ImageSet, batch_size: int = 1000,
                      device="cpu") -> torch.Tensor:  # fmt: skip
    """How many images of each of `data`'s classes `model` classifies right (top-1), as an int64
    tensor on `device` (model put in eval mode, then back)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(data.num_classes, dtype=torch.int64, device=device)
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device)
        labels = data.labels[start : start + batch_size].to(device)
        right = model(images).argmax(dim=1) == labels
        correct += torch.bincount(labels[right], minlength=data.num_classes)
    model.train(was_training)
    return correct


def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 1000, device="cpu") -> float:
    """Top-1 accuracy of `model` on `data` (model put in eval mode, then back)."""
    return (correct_per_class(model, data, batch_size, device).sum() / max(len(data), 1)).item()


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator):
    """Each image shifted by up to max_shift pixels in x and y (drawn from `generator`, on the
    images' device), its border pixels repeated into the uncovered edge. No host sync."""
    if max_shift == 0:
        return images
    n, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator, device=device)
    rows = shifts[:, :1] + torch.arange(height, device=device)  # (n, height)
    cols = shifts[:, 1:] + torch.arange(width, device=device)  # (n, width)
    # one gather of flat pixel indices: several times faster than 4-d advanced indexing
    pixels = rows[:, :, None] * padded.shape[-1] + cols[:, None, :]
    shifted = padded.flatten(2).gather(2, pixels.view(n, 1, -1).expand(n, channels, -1))
    return shifted.view(n, channels, height, width)


def random_mirror(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2 (drawn from `generator`, on the
    images' device). No host sync."""
    mirrored = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(mirrored.view(-1, *[1] * (images.dim() - 1)), images.flip(-1), images)


def train_classifier(
    model: nn.Module, train: ImageSet, test: ImageSet | None, config: TrainConfig,
    progress: bool = True, checkpoint: str | os.PathLike | None = None, resume: bool = False,
) -> list[tuple[int, float]]:
    """SGD training, with a progress bar unless not `progress`; returns the (epoch, test
    accuracy) curve.

    With a `checkpoint` path, the training state is written there atomically after every epoch
    and, on SIGINT or SIGTERM, after the step under way (then
    :class:`~dfkd_fast.stopping.RunStopped` is raised); ``resume=True`` continues from it to the
    same weights. A checkpoint found without ``resume`` is refused, not overwritten. It is left
    in place when training ends, marked finished: delete it once the model is saved."""
    device = available_device(config.device)
    model.to(device).train()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                                weight_decay=config.weight_decay, nesterov=True)  # fmt: skip
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    curve: list[tuple[int, float]] = []
    first_epoch, order, first_batch = 1, None, 0
    state = _training_to_resume(checkpoint, resume, config, len(train))
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(f"{str(checkpoint)!r} holds another architecture: {error}") from None
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        curve = [(int(epoch), float(value)) for epoch, value in state["curve"]]
        first_epoch, order, first_batch = state["epoch"], state["order"], state["next_batch"]

    def save(epoch: int, order: torch.Tensor | None, next_batch: int) -> None:
        atomic_torch_save(checkpoint, {
            "train_config": asdict(config), "train_size": len(train), "epoch": epoch,
            "order": order, "next_batch": next_batch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "generator": generator.get_state(), "curve": [list(entry) for entry in curve],
        })  # fmt: skip

    bar = tqdm(range(first_epoch, config.epochs + 1), desc="teacher (supervised)", unit="epoch",
               initial=first_epoch - 1, total=config.epochs, disable=not progress)  # fmt: skip
    with deferred_stop_signals(checkpoint is not None) as stop_signal:
        for epoch in bar:
            if order is None:
                order = torch.randperm(len(train), generator=generator)
            batches = order.split(config.batch_size)
            for index in range(first_batch, len(batches)):
                images = random_translate(train.images[batches[index]], config.max_shift, generator)
                labels = train.labels[batches[index]].to(device)
                loss = F.cross_entropy(model(images.to(device)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                stopped_by = stop_signal()
                if stopped_by and (epoch, index + 1) != (config.epochs, len(batches)):
                    save(epoch, order, index + 1)
                    bar.close()
                    raise RunStopped(stopped_by, (epoch - 1) * steps_per_epoch + index + 1,
                                     config.epochs * steps_per_epoch, Path(checkpoint))  # fmt: skip
            order, first_batch = None, 0
            if test is not None:
                curve.append((epoch, accuracy(model, test, device=device)))
                bar.set_postfix(test_acc=f"{curve[-1][1]:.4f}")
            if checkpoint is not None:
                save(epoch + 1, None, 0)
    model.eval()
    return curve


def _training_to_resume(checkpoint, resume: bool, config: TrainConfig, train_size: int):
    """The training state in `checkpoint` when there is one to resume (None when there is none),
    checked against this training's config and data."""
    if checkpoint is None or not Path(checkpoint).exists():
        return None
    if not resume:
        raise ValueError(f"{str(checkpoint)!r} holds an unfinished training: resume it, or delete "
                         "it to start again")  # fmt: skip
    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "train_config" not in state:
        raise ValueError(f"{str(checkpoint)!r} is not a dfkd-fast training checkpoint")
    differing = {name: (state["train_config"].get(name), value)
                 for name, value in asdict(config).items()
                 if name != "device" and state["train_config"].get(name) != value}  # fmt: skip
    if differing:
        detail = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in differing.items())
        raise ValueError(f"cannot resume a training made with another config ({detail})")
    if state["train_size"] != train_size:
        raise ValueError(f"cannot resume a training on {state['train_size']} images with "
                         f"{train_size}")  # fmt: skip
    return state


def classifier_record(info: ClassifierInfo) -> dict:
    """`info` as plain data (lists, not tuples) for a weights_only checkpoint."""
    record = asdict(info)
    record["image_shape"] = list(info.image_shape)
    record["mean"], record["std"] = list(info.mean), list(info.std)
    return record


def save_classifier(path: str | os.PathLike, model: nn.Module, info: ClassifierInfo) -> None:
    atomic_torch_save(path, {"classifier": classifier_record(info),
                             "state_dict": model.state_dict()})  # fmt: skip


def load_classifier(
    path: str | os.PathLike, info: ClassifierInfo | None = None
) -> tuple[nn.Module, ClassifierInfo]:
    """A classifier and its info from a checkpoint of save_classifier, or from a bare state dict
    (a dict with "state_dict", "module." prefixes allowed) when `info` describes it. In eval mode,
    loaded with weights_only=True."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds no state dict")
    if "classifier" in checkpoint:
        record = dict(checkpoint["classifier"])
        record["image_shape"] = tuple(record["image_shape"])
        record["mean"], record["std"] = tuple(record["mean"]), tuple(record["std"])
        info = ClassifierInfo(**record)
    elif info is None:
        raise ValueError(
            f"{str(path)!r} does not say which architecture it holds: give its architecture, "
            "image shape and standardisation (--teacher-arch, --dataset)"
        )
    state_dict = strip_prefix(checkpoint.get("state_dict", checkpoint))
    model = build_classifier(info.arch, info.num_classes, info.image_shape[0])
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        misfit = state_dict_misfit(model.state_dict(), state_dict) or error
        raise ValueError(f"{str(path)!r} does not hold a {info.arch}: {misfit}") from None
    return model.eval(), info


def state_dict_misfit(expected: dict, given: dict, examples: int = 3) -> str:
    """How `given` differs from the state dict `expected` (missing and unexpected names, shapes
    that differ), a few examples of each; empty when it fits. BatchNorm's num_batches_tracked
    may be missing (older checkpoints lack it, and load_state_dict accepts that)."""
    missing = [name for name in expected
               if name not in given and not name.endswith("num_batches_tracked")]  # fmt: skip
    unexpected = [name for name in given if name not in expected]
    reshaped = [f"{name} {tuple(given[name].shape)} for {tuple(expected[name].shape)}"
                for name in expected if name in given and hasattr(given[name], "shape")
                and given[name].shape != expected[name].shape]  # fmt: skip
    parts = []
    for what, names in (("missing", missing), ("unexpected", unexpected),
                        ("of another shape", reshaped)):  # fmt: skip
        if names:
            more = f", ... ({len(names)} in all)" if len(names) > examples else ""
            parts.append(f"{what}: {', '.join(names[:examples])}{more}")
    return "; ".join(parts)


def checkpoint_name(arch: str, dataset: str) -> str:
    return f"{dataset}-{arch}.pt"


def default_output(arch: str, dataset: str) -> Path:
    return Path("teachers") / checkpoint_name(arch, dataset)
