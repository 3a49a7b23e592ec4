"""End-to-end demo on scikit-learn's bundled digits: train a teacher, throw its data away, and
distill it into a smaller student from synthetic images alone.

The data-free step follows the adversarial DFKD family (DAFL, DFAD, DeepInversion): a generator
makes images whose batch statistics match the teacher's BatchNorm running statistics, that the
teacher classifies confidently and evenly across classes, and on which student and teacher
disagree; the student learns the teacher's temperature-scaled soft outputs on them. The digits'
test split is used only to report accuracy, never to steer training.
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfkd_fast.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
)
from dfkd_fast.models import Generator, small_cnn
from dfkd_fast.ops import sample_prior

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 600  # generator steps
    student_steps_per_generator_step: int = 2
    batch_size: int = 128
    latent_dim: int = 64
    teacher_width: int = 32
    student_width: int = 8
    teacher_epochs: int = 30
    temperature: float = 4.0
    bn_loss_weight: float = 1.0
    confidence_weight: float = 0.5
    class_balance_weight: float = 5.0
    adversarial_weight: float = 0.5
    teacher_lr: float = 1e-3
    student_lr: float = 1e-3
    generator_lr: float = 1e-3
    eval_every: int = 50
    seed: int = 0
    output_dir: str = "runs/digits-demo"
    device: str = "cpu"

    def __post_init__(self):
        positive_ints = (
            "steps",
            "student_steps_per_generator_step",
            "batch_size",
            "latent_dim",
            "teacher_width",
            "student_width",
            "teacher_epochs",
            "eval_every",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("temperature", "teacher_lr", "student_lr", "generator_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        weights = ("bn_loss_weight", "confidence_weight", "class_balance_weight", "adversarial_weight")
        for name in weights:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")


@dataclass
class Digits:
    train_images: torch.Tensor  # (N, 1, 8, 8), standardised
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class DemoResult:
    teacher_accuracy: float
    student_accuracy: float
    teacher_parameters: int
    student_parameters: int
    accuracy_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    output_dir: str = ""


def load_digits(seed: int, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's 1797 8x8 digits, shuffled with `seed`, split, standardised with the
    training split's mean and standard deviation."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError(
            "the demo reads scikit-learn's bundled digits: pip install 'dfkd-fast[examples]'"
        ) from None
    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    test_size = int(len(images) * test_fraction)
    train_images, test_images = images[test_size:], images[:test_size]
    mean, std = train_images.mean(), train_images.std()
    return Digits(
        (train_images - mean) / std,
        labels[test_size:],
        (test_images - mean) / std,
        labels[:test_size],
    )


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train(was_training)
    return correct


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_teacher(
    data: Digits, config: DemoConfig, generator: torch.Generator, device: torch.device
) -> nn.Module:
    """Supervised training of the teacher on the digits' training split."""
    teacher = small_cnn(config.teacher_width, NUM_CLASSES, IMAGE_SHAPE[0]).to(device)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=config.teacher_lr)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    teacher.train()
    for _ in tqdm(range(config.teacher_epochs), desc="teacher (supervised)", unit="epoch"):
        order = torch.randperm(len(images), generator=generator).to(device)
        for batch in order.split(64):
            loss = F.cross_entropy(teacher(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def bn_statistic_losses(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Appends, for every BatchNorm2d input seen while the block runs, the DeepInversion loss
    ||batch mean - running mean||_2 + ||batch var - running var||_2 to the yielded list."""
    losses: list[torch.Tensor] = []

    def record(module: nn.BatchNorm2d, inputs, output) -> None:
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
        losses.append(
            torch.linalg.vector_norm(mean - module.running_mean)
            + torch.linalg.vector_norm(var - module.running_var)
        )

    handles = [
        m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    ]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def distill_data_free(
    teacher: nn.Module,
    student: nn.Module,
    image_generator: Generator,
    data: Digits,
    config: DemoConfig,
    generator: torch.Generator,
    device: torch.device,
) -> list[tuple[int, float]]:
    """Adversarial data-free distillation; returns the (step, test accuracy) curve."""
    generator_optimizer = torch.optim.Adam(
        image_generator.parameters(), lr=config.generator_lr, betas=(0.5, 0.999)
    )
    student_optimizer = torch.optim.Adam(student.parameters(), lr=config.student_lr)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)

    def latent() -> torch.Tensor:
        return sample_prior(
            config.batch_size, config.latent_dim, generator=generator, device=device
        )

    curve: list[tuple[int, float]] = []
    progress = tqdm(
        range(1, config.steps + 1), desc="student (data-free)", unit="step", mininterval=1.0
    )
    with bn_statistic_losses(teacher) as bn_losses:
        for step in progress:
            # Generator: typical for the teacher, confident, class-balanced, and disputed.
            image_generator.train()
            images = image_generator(latent())
            bn_losses.clear()
            teacher_logits = teacher(images)
            bn_loss = torch.stack(bn_losses).sum()
            student_logits = student(images)
            confidence = F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))
            class_mean = F.softmax(teacher_logits, dim=1).mean(dim=0)
            negative_class_entropy = (class_mean * torch.log(class_mean)).sum()
            disagreement = F.l1_loss(student_logits, teacher_logits)
            generator_loss = (
                config.bn_loss_weight * bn_loss
                + config.confidence_weight * confidence
                + config.class_balance_weight * negative_class_entropy
                - config.adversarial_weight * disagreement
            )
            generator_optimizer.zero_grad(set_to_none=True)
            generator_loss.backward()
            generator_optimizer.step()

            # Student: imitate the teacher on fresh samples; no gradient reaches the generator.
            for _ in range(config.student_steps_per_generator_step):
                with torch.no_grad():
                    images = image_generator(latent())
                    teacher_logits = teacher(images)
                student_loss = kd_loss(student(images), teacher_logits, config.temperature)
                student_optimizer.zero_grad(set_to_none=True)
                student_loss.backward()
                student_optimizer.step()

            if step % config.eval_every == 0 or step == config.steps:
                student_accuracy = accuracy(student, test_images, test_labels)
                curve.append((step, student_accuracy))
                progress.set_postfix(
                    student_acc=f"{student_accuracy:.3f}",
                    kd=f"{student_loss.item():.3f}",
                    bn=f"{bn_loss.item():.3f}",
                )
    return curve


def _curve_csv(curve: list[tuple[int, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "student_test_accuracy"])
    writer.writerows(curve)
    return buffer.getvalue()


def _plot_curve(result: DemoResult, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, accuracies = zip(*result.accuracy_curve)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(steps, accuracies, marker=".", label="student (data-free)")
    axes.axhline(result.teacher_accuracy, color="gray", linestyle="--", label="teacher")
    axes.set_xlabel("generator step")
    axes.set_ylabel("test accuracy")
    axes.set_title("digits: data-free distillation")
    axes.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def run_demo(config: DemoConfig = DemoConfig()) -> DemoResult:
    """Trains the teacher, distills the student data-free, writes the report; returns it."""
    output_dir = ensure_writable_dir(config.output_dir)
    device = torch.device(config.device)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    data = load_digits(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # module initialisers draw from the global generator
        teacher = train_teacher(data, config, generator, device)
        student = small_cnn(config.student_width, NUM_CLASSES, IMAGE_SHAPE[0]).to(device)
        image_generator = Generator(config.latent_dim, IMAGE_SHAPE).to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
    teacher_accuracy = accuracy(teacher, test_images, test_labels)
    curve = distill_data_free(
        teacher, student, image_generator, data, config, generator, device
    )
    result = DemoResult(
        teacher_accuracy=teacher_accuracy,
        student_accuracy=curve[-1][1],
        teacher_parameters=count_parameters(teacher),
        student_parameters=count_parameters(student),
        accuracy_curve=curve,
        seconds=time.perf_counter() - started,
        output_dir=str(output_dir),
    )
    atomic_torch_save(
        output_dir / "student.pt", {"state_dict": student.state_dict(), "config": asdict(config)}
    )
    atomic_write_text(output_dir / "accuracy_curve.csv", _curve_csv(curve))
    _plot_curve(result, output_dir / "accuracy_curve.png")
    atomic_write_json(output_dir / "metrics.json", {"config": asdict(config), **asdict(result)})
    return result
