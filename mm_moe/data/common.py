"""Helpers shared by the datasets: JSON reading with clear errors, image lookup and loading, padding, and the
deterministic per-epoch loader of the map-style datasets."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mm_moe.data.skips import SampleError, SkipCounter
from mm_moe.data.transforms import seeded
from mm_moe.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def read_json(path: str | Path, required: tuple[str, ...] = ()) -> Any:
    """Parse a JSON file; `required` top-level keys must be present."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    for key in required:
        if not isinstance(data, dict) or key not in data:
            raise InputError(f"{path}: missing top-level key {key!r}")
    return data


def require(record: dict, fields: tuple[str, ...], where: str) -> None:
    """Raise a KeyError naming `where` (file and index) if a field is missing."""
    missing = [f for f in fields if f not in record]
    if missing:
        raise InputError(f"{where}: missing field(s) {missing}")


def images_by_number(folder: str | Path) -> dict[int, Path]:
    """Images in `folder` (recursive) keyed by the number ending their name: COCO_val2014_000000000042.jpg -> 42."""
    out = {}
    for p in Path(folder).rglob("*"):
        m = re.search(r"(\d+)$", p.stem)
        if p.suffix.lower() in IMAGE_SUFFIXES and m:
            out[int(m.group(1))] = p
    return out


def images_by_name(folder: str | Path) -> dict[str, Path]:
    """Images in `folder` (recursive) keyed by file name."""
    return {p.name: p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `im`. Integer images of more than 8 bits (16-bit PNGs: modes I;16* and I) are scaled to
    8 bits by value; PIL's convert("RGB") would clip everything above 255 to white."""
    if im.mode.startswith("I"):
        scaled = np.asarray(im, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """8-bit RGB PIL image (`to_rgb`); InputError naming the file when it is unreadable, truncated or too large
    (PIL's decompression-bomb limit)."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except Image.DecompressionBombError as err:
        raise InputError(f"{path}: image too large to decode ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:  # SyntaxError: PIL's "broken PNG file"
        raise InputError(f"{path}: cannot read image ({' '.join(str(err).split())})") from err


class Skipped(NamedTuple):
    """A dataset item that could not be read (the collate leaves it out and counts it)."""

    cause: str


def skipping(skips: SkipCounter, read: Callable[[], dict]) -> dict | Skipped:
    """read(), or, when it raises InputError (an unreadable, truncated or oversized image), a Skipped item, counted
    and logged by `skips` as pretraining logs its skipped samples."""
    try:
        return read()
    except InputError as err:
        skips(SampleError(str(err)))
        return Skipped(str(err))


def collate_kept(items: list[dict | Skipped], collate: Callable[[list[dict]], dict]) -> dict:
    """collate() of the readable items, with "num_skipped" (how many were left out); {"num_skipped": n} alone when
    none could be read (the trainer passes over such a batch, and evaluation stops: every item must be scored)."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = len(items) - len(good)
    return {**collate(good), "num_skipped": skipped} if good else {"num_skipped": skipped}


def text_of(record: dict, field: str, where: str) -> str:
    """record[field] when it is text; InputError naming `where` otherwise (a null question, a missing caption)."""
    value = record.get(field)
    if not isinstance(value, str):
        raise InputError(f"{where}: {field} is {value!r}, expected text")
    return value


class SeededItems:
    """Mixin for map-style datasets: an item's augmentation depends only on (seed, epoch, index, image number)."""

    transform: Callable
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch

    def load(self, path: Path, index: int, which: int = 0) -> Tensor:
        return seeded(self.transform, load_image(path), self.seed, self.epoch, index, which)


def pad(seqs: list[list[int]], value: int) -> Tensor:
    """Right-pad lists of ids into Long[B, max_len]."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order: distinct for every (run seed, epoch) pair."""
    return seed * 100_003 + epoch


def epoch_loader(ds: Dataset, batch_size: int, collate: Callable, *, seed: int, epoch: int, num_workers: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): exact resume by skipping batches.

    Under DDP every rank takes a disjoint stride of the same permutation (equal batch counts: the tail is dropped).
    """
    ds.set_epoch(seed, epoch)  # augmentation from (seed, epoch, index): exact after a resume, any worker count
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = list(RandomSampler(ds, generator=g)) if shuffle else list(range(len(ds)))
    if world > 1:
        per_rank = len(order) // world
        order = order[rank * per_rank:(rank + 1) * per_rank]
    return DataLoader(ds, batch_size=batch_size, sampler=order, collate_fn=collate, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(epoch_seed(seed, epoch) + 1), drop_last=shuffle)
