"""A heterogeneous unlabeled collection: sources of any size, shape and channel count (other
data sets, image folders, noise) concatenated into one indexable set whose batches come out in
the teacher's input format (resized, channel-converted, standardised).

Sources keep their images as uint8 (N, C, H, W) in memory (a 60000-image MNIST is 47 MB); the
conversion to the teacher's format happens per batch, so a collection of any size is scored and
sampled without ever holding a float copy of it.

    collection = Collection.from_specs(["fashion-mnist:../shared/data/fashion-mnist",
                                        "noise:10000"], image_shape=(1, 32, 32),
                                       mean=(0.1307,), std=(0.3081,))
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_fast.data import DATASETS, _load_files, load_idx_images

# ITU-R BT.601 luma, for colour -> grayscale
LUMA = (0.299, 0.587, 0.114)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Source:
    name: str
    images: torch.Tensor  # (N, C, H, W) uint8

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor):
            raise TypeError(f"source {self.name!r}: images must be a tensor, got "
                            f"{type(self.images).__name__}")  # fmt: skip
        if self.images.dtype != torch.uint8:
            raise TypeError(f"source {self.name!r}: images must be uint8, got {self.images.dtype}"
                            " (use Source.from_float for [0, 1] floats)")  # fmt: skip
        if self.images.dim() != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(f"source {self.name!r}: images must be (N, 1 or 3, H, W), got "
                             f"{tuple(self.images.shape)}")  # fmt: skip
        if len(self.images) == 0:
            raise ValueError(f"source {self.name!r} is empty")

    @classmethod
    def from_float(cls, name: str, images: torch.Tensor) -> Source:
        """From float images in [0, 1], (N, C, H, W); NaN or infinite pixels are refused."""
        if not torch.is_floating_point(images):
            raise TypeError(f"source {name!r}: from_float needs floating-point images")
        if not torch.isfinite(images).all():
            raise ValueError(f"source {name!r} has NaN or infinite pixels")
        return cls(name, (images.clamp(0, 1) * 255).round().to(torch.uint8))

    def __len__(self) -> int:
        return len(self.images)


def _nchw_uint8(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    elif tensor.dim() == 4 and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2).contiguous()
    if tensor.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {tensor.dtype}")
    return tensor


def dataset_source(name: str, folder: str | os.PathLike, split: str = "train") -> Source:
    """The images of a known data set (labels dropped)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    train_files, test_files = DATASETS[name][:2]
    images, _ = _load_files(Path(folder), train_files if split == "train" else test_files)
    return Source(name, (images * 255).round().to(torch.uint8))


def file_source(path: str | os.PathLike) -> Source:
    """An IDX image file, an .npz with `images`, or a folder of image files."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no image files in {str(path)!r}")
        first = Image.open(files[0]).convert("RGB")
        size = first.size
        arrays = [np.asarray(Image.open(f).convert("RGB").resize(size)) for f in files]
        return Source(path.name, _nchw_uint8(np.stack(arrays)))
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise ValueError(f"{str(path)!r} has no 'images' array")
            return Source(path.stem, _nchw_uint8(archive["images"]))
    return Source(path.name, _nchw_uint8(load_idx_images(path)))


def noise_source(count: int, image_shape=(1, 32, 32), seed: int = 0) -> Source:
    """`count` images, half uniform noise, half smoothed Gaussian blobs (noise with structure)."""
    if count < 1:
        raise ValueError(f"a noise source needs count >= 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = image_shape
    uniform = torch.rand(count - count // 2, channels, height, width, generator=generator)
    coarse = torch.rand(count // 2, channels, max(1, height // 4), max(1, width // 4),
                        generator=generator)  # fmt: skip
    blobs = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return Source.from_float("noise", torch.cat([uniform, blobs]))


def source_from_spec(spec: str, image_shape) -> Source:
    """'noise:COUNT', 'DATASET:FOLDER' (a known data set's training images), or 'PATH' (file or
    image folder); a suffix '@FRACTION' keeps a random subset of that fraction (seeded)."""
    spec, _, fraction = spec.partition("@")
    source = _whole_source(spec, image_shape)
    if not fraction:
        return source
    try:
        share = float(fraction)
    except ValueError:
        raise ValueError(f"'@' must be followed by a fraction, got {fraction!r}") from None
    if not 0 < share <= 1:
        raise ValueError(f"the fraction after '@' must be in (0, 1], got {share}")
    count = max(1, round(share * len(source)))
    keep = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:count]
    return Source(f"{source.name}@{fraction}", source.images[keep.sort().values])


def _whole_source(spec: str, image_shape) -> Source:
    kind, _, argument = spec.partition(":")
    if kind == "noise":
        if not argument.isdigit():
            raise ValueError(f"noise source needs a count, 'noise:10000', got {spec!r}")
        return noise_source(int(argument), image_shape)
    if kind in DATASETS and argument:
        return dataset_source(kind, argument)
    if kind in DATASETS and not Path(spec).exists():
        raise ValueError(f"source {spec!r} needs the data set's folder: '{kind}:FOLDER'")
    return file_source(spec)


class Collection(torch.utils.data.Dataset):
    """Sources concatenated; item i is one image in the teacher's format, (C, H, W) float32."""

    def __init__(self, sources: list[Source], image_shape, mean, std):
        if not sources:
            raise ValueError("an unlabeled collection needs at least one source")
        for source in sources:
            if not isinstance(source, Source):
                raise TypeError(f"sources must be Source objects, got {type(source).__name__}")
        self.sources = list(sources)
        self.image_shape = tuple(image_shape)
        channels = self.image_shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {mean}, {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        sizes = torch.tensor([len(s) for s in sources])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self.source_index = torch.repeat_interleave(torch.arange(len(sources)), sizes)

    @classmethod
    def from_specs(cls, specs: list[str], image_shape, mean, std) -> Collection:
        return cls([source_from_spec(spec, image_shape) for spec in specs], image_shape, mean, std)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    def fingerprint(self) -> str:
        """Identifies the collection's content cheaply: names, shapes and a sample of bytes."""
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(f"{source.name}{tuple(source.images.shape)}".encode())
            step = max(1, len(source) // 64)
            digest.update(source.images[::step].numpy().tobytes())
        digest.update(f"{self.image_shape}{self.mean.tolist()}{self.std.tolist()}".encode())
        return digest.hexdigest()[:16]

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0
        channels, height, width = self.image_shape
        if images.shape[1] != channels:
            if channels == 1:
                luma = torch.tensor(LUMA).view(1, 3, 1, 1)
                images = (images * luma).sum(dim=1, keepdim=True)
            else:
                images = images.expand(-1, channels, -1, -1)
        if images.shape[-2:] != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear",
                                   align_corners=False, antialias=True)  # fmt: skip
        return (images - self.mean) / self.std

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Images `indices` (1-D int64, CPU) in the teacher's format, (len, C, H, W) float32."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"collection indices must be in [0, {len(self)})")
        out = torch.empty(len(indices), *self.image_shape)
        owners = self.source_index[indices]
        for source_id in owners.unique().tolist():
            where = (owners == source_id).nonzero().squeeze(1)
            local = indices[where] - self.offsets[source_id]
            out[where] = self._convert(self.sources[source_id].images[local])
        return out

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.batch(torch.tensor([index]))[0]
