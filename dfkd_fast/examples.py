"""The embedded default: a teacher trained on scikit-learn's bundled 8x8 digits (no download, a
few seconds), which `dfkd-fast distill` without --teacher distills into a smaller CNN."""

from __future__ import annotations

from pathlib import Path

from dfkd_fast.data import load_digits
from dfkd_fast.models import build_classifier
from dfkd_fast.training import (
    ClassifierInfo,
    TrainConfig,
    accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)

DIGITS_TEACHER_ARCH = "cnn32"
DIGITS_STUDENT_ARCH = "cnn8"
DIGITS_TEACHER_TRAINING = TrainConfig(epochs=15, batch_size=64, lr=0.05, max_shift=1)


def digits_teacher(path: Path, seed: int = 0, progress: bool = True):
    """(teacher, info, test set): loaded from `path` when a teacher is there, else trained on
    the digits' training split and saved there."""
    test = load_digits("test", seed=seed)
    if path.exists():
        teacher, info = load_classifier(path)
        return teacher, info, test
    train = load_digits("train", seed=seed)
    teacher = build_classifier(DIGITS_TEACHER_ARCH, train.num_classes, 1, seed=seed)
    train_classifier(teacher, train, test, DIGITS_TEACHER_TRAINING, progress)
    info = ClassifierInfo(DIGITS_TEACHER_ARCH, train.num_classes, train.image_shape, train.mean,
                          train.std, "digits", accuracy(teacher, test))  # fmt: skip
    save_classifier(path, teacher, info)
    return teacher, info, test

