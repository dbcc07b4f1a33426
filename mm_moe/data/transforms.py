"""torchvision v2 image transforms (BEiT-3 normalisation: mean = std = 0.5)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def train_transform(img_size: int, min_scale: float = 0.5) -> v2.Compose:
    """Random resized crop, no flip (a flip would break left/right questions and captions), to normalised float."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(img_size: int) -> v2.Compose:
    """Resize to a square, to normalised float."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((img_size, img_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
