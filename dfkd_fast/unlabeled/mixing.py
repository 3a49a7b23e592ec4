"""Mixing of collection samples (mixup, Zhang et al. 2018; CutMix, Yun et al. 2019): the mixed
image is a new input, and its target is the teacher's output on it, not a mix of labels."""

from __future__ import annotations

import torch


def mix_batch(images: torch.Tensor, mixup_fraction: float, cutmix_fraction: float,
              generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """The first `mixup_fraction` of the batch mixed with random partners from it, the next
    `cutmix_fraction` given a random box of a partner; the rest unchanged. No host sync."""
    count, _, height, width = images.shape
    mixup_count = round(count * mixup_fraction)
    cutmix_count = min(count - mixup_count, round(count * cutmix_fraction))
    if mixup_count + cutmix_count == 0:
        return images
    device = images.device
    partners = images[torch.randperm(count, generator=generator, device=device)]
    share = torch.rand(count, 1, 1, 1, generator=generator, device=device)  # lambda per sample
    mixed = images.clone()
    head = slice(0, mixup_count)
    mixed[head] = share[head] * images[head] + (1 - share[head]) * partners[head]
    if cutmix_count:
        part = slice(mixup_count, mixup_count + cutmix_count)
        side = (1 - share[part].view(-1, 1, 1)).sqrt()  # box area = 1 - lambda
        box_height, box_width = side * height, side * width
        corner = torch.rand(cutmix_count, 2, 1, 1, generator=generator, device=device)
        top = corner[:, 0] * (height - box_height)
        left = corner[:, 1] * (width - box_width)
        rows = torch.arange(height, device=device).view(1, -1, 1)
        cols = torch.arange(width, device=device).view(1, 1, -1)
        inside = ((rows >= top) & (rows < top + box_height) & (cols >= left)
                  & (cols < left + box_width)).unsqueeze(1)  # fmt: skip
        mixed[part] = torch.where(inside, partners[part], images[part])
    return mixed
