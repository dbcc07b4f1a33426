"""torchvision v2 image transforms (BEiT-3 normalisation: mean = std = 0.5), and per-sample seeding."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2


def seed_of(*key: Any) -> int:
    """A stable 63-bit seed from a key like (run seed, epoch, sample id); unlike hash(), the same in every process."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def seeded(transform: Callable, image: Any, *key: Any) -> Any:
    """Apply a random transform with torch's RNG seeded by `key`, leaving the global RNG untouched.

    Augmentation then depends only on (seed, epoch, sample), not on what ran before: a resumed run that
    skips batches, or a different number of DataLoader workers, sees exactly the same crops.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed_of(*key))  # torch.manual_seed would also queue CUDA/XPU seeding
        return transform(image)

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def train_transform(img_size: int, min_scale: float = 0.5, dihedral: bool = False) -> v2.Compose:
    """Random resized crop, no flip by default (a flip would break left/right questions and captions), to
    normalised float. min_scale 1: no crop (a crop of the whole area would still change the aspect).
    dihedral: a random one of the square's 8 symmetries (flip, quarter turns), for data whose answers do not
    depend on orientation (easy-VQA: 8x the views of its 4,000 training images)."""
    size = v2.Resize((img_size, img_size), antialias=True) if min_scale == 1 else \
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True)
    turns = [v2.RandomHorizontalFlip(), v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)])] \
        if dihedral else []
    return v2.Compose([
        v2.ToImage(),
        size,
        *turns,
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
