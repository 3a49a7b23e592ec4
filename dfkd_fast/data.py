"""Labelled image data sets from files the user has, as float tensors ready for a classifier.

Formats: MNIST-style IDX (``*-images-idx3-ubyte[.gz]`` with ``*-labels-idx1-ubyte[.gz]``), NumPy
``.npz`` archives with ``images`` (N, H, W[, C]) uint8 and ``labels``, ``.npz`` archives of JPEG
bytes (``jpeg``, ``offsets``, ``labels``), and scikit-learn's bundled 8x8 digits. Images become
(N, C, H, W) float32 in [0, 1], then are standardised per channel; the statistics used are
recorded with the data so that a trained teacher remembers them.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ImageSet",
    "DATASETS",
    "load_dataset",
    "load_idx_images",
    "load_idx_labels",
]


@dataclass
class ImageSet:
    """Standardised images (N, C, H, W) float32 with int64 labels, and the standardisation."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def __post_init__(self):
        if self.images.dim() != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"need images (N, C, H, W) and N labels, got {tuple(self.images.shape)} and "
                f"{tuple(self.labels.shape)}"
            )
        if self.labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 tensor, got {self.labels.dtype}")
        if len(self.labels):
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"labels must be in [0, num_classes={self.num_classes}), got "
                                 f"labels from {low} to {high}")  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_counts(self) -> torch.Tensor:
        """How many images each class has."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, count: int) -> ImageSet:
        return ImageSet(self.images[:count], self.labels[:count], self.mean, self.std,
                        self.num_classes)  # fmt: skip


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    with _open(path) as handle:
        data = handle.read()
    if len(data) < 4 + 4 * dims or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{str(path)!r} is not an IDX file of {dims} dimension(s)")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{str(path)!r} is truncated: {body.size} of {int(np.prod(shape))} bytes")
    return body.reshape(shape)


def load_idx_images(path: str | os.PathLike) -> np.ndarray:
    """(N, H, W) uint8 from an IDX3 file (gzipped or not)."""
    return _read_idx(Path(path), 0x00000803, 3)


def load_idx_labels(path: str | os.PathLike) -> np.ndarray:
    return _read_idx(Path(path), 0x00000801, 1)


def _decode_jpegs(archive) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("decoding JPEG archives needs Pillow: pip install pillow") from None
    data, offsets = archive["jpeg"], archive["offsets"]
    return np.stack([
        np.asarray(Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        for i in range(len(offsets) - 1)
    ])  # fmt: skip


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        if "images" in archive:
            images = archive["images"]
        elif "jpeg" in archive:
            images = _decode_jpegs(archive)
        else:
            raise ValueError(f"{str(path)!r} has neither 'images' nor 'jpeg' arrays")
        return images, archive["labels"]


def _to_float_nchw(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(images))  # a writable copy
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)  # (N, H, W) grayscale
    elif tensor.dim() == 4 and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)  # NHWC
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got {tuple(tensor.shape)}")
    tensor = tensor.float()
    return tensor / 255.0 if images.dtype == np.uint8 else tensor


# name -> (train files, test files, standardisation mean, std, number of classes). Paths are
# relative to the data set's folder; statistics are those of the training images (README of
# shared/data), or of the pretrained CIFAR teachers.
DATASETS = {
    "mnist": (
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        (0.1307,), (0.3081,), 10,
    ),
    "fashion-mnist": (
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        (0.2860,), (0.3530,), 10,
    ),
    "kmnist": (
        ("train_first7000.npz",),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        (0.1918,), (0.3483,), 10,
    ),
    "cifar10": (
        ("train_first4000.npz",), ("test_first1000.npz",),
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 10,
    ),
    "cifar10-jpeg": (
        ("train.npz",), ("test.npz",),
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 10,
    ),
}  # fmt: skip


def _load_files(folder: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    paths = [folder / name for name in files]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} not found (this split of the data set is "
                                    f"{', '.join(files)} in its folder)")  # fmt: skip
    if len(paths) == 2:
        images, labels = load_idx_images(paths[0]), load_idx_labels(paths[1])
    else:
        images, labels = _load_npz(paths[0])
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels in {str(folder)!r}")
    return _to_float_nchw(images), torch.from_numpy(labels.astype(np.int64))


def _standardise(images: torch.Tensor, mean, std) -> torch.Tensor:
    if len(mean) != images.shape[1]:
        raise ValueError(f"{len(mean)} channel statistics for {images.shape[1]} channels")
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pads (N, C, H, W) images, in [0, 1], to size x size (LeNet-5 takes 28 -> 32)."""
    height, width = images.shape[-2:]
    if height > size or width > size:
        raise ValueError(f"cannot pad {height}x{width} images to {size}x{size}")
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top))


def load_dataset(
    name: str, folder: str | os.PathLike, split: str, image_size: int | None = None
) -> ImageSet:
    """The train or test split of a known data set from its folder (see DATASETS), images
    zero-padded to ``image_size`` if given, then standardised."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)} or digits, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train_files, test_files, mean, std, num_classes = DATASETS[name]
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {str(folder)!r} not found")
    images, labels = _load_files(folder, train_files if split == "train" else test_files)
    if image_size is not None:
        images = pad_to(images, image_size)
    return ImageSet(_standardise(images, mean, std), labels, mean, std, num_classes)


def load_digits(split: str, seed: int = 0, test_fraction: float = 0.2) -> ImageSet:
    """scikit-learn's 1797 8x8 digits, shuffled with `seed` and split, standardised with the
    training split's statistics. Needs scikit-learn (the `examples` extra)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError(
            "the digits data set ships with scikit-learn: pip install 'dfkd-fast[examples]'"
        ) from None
    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    test_size = int(len(images) * test_fraction)
    train_images = images[test_size:]
    mean, std = (train_images.mean().item(),), (train_images.std().item(),)
    selected = slice(test_size, None) if split == "train" else slice(None, test_size)
    return ImageSet(_standardise(images[selected], mean, std), labels[selected], mean, std, 10)
