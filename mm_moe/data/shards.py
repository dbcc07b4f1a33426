"""Pretraining data from webdataset shards of {key}.jpg|png, {key}.txt, {key}.json samples.

shuffle -> decode -> torchvision v2 transform -> tokenise + MLM masking -> BEiT block masking -> batches.
Under torchrun each rank reads its own shards (split_by_node) and each worker its own (split_by_worker);
for DDP use `resampled=True` with `epoch_batches`, so every rank yields the same number of batches.
A corrupt image, a sample without caption or a truncated tar is skipped, logged and counted: each batch
carries `num_skipped`, the samples its worker skipped since its previous batch.
"""

from __future__ import annotations

import logging
import random
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from mm_moe.config import BEiT3Config, PretrainDataConfig
from mm_moe.constants import IGNORE_INDEX
from mm_moe.data.common import pad
from mm_moe.data.masking import BlockMasking, mask_text
from mm_moe.data.transforms import eval_transform, seed_of, seeded, train_transform

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_urls(spec: str | Path) -> str | list[str]:
    """A directory means every .tar inside it; anything else is passed to webdataset as is."""
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{spec}: no .tar shards in this directory")
        return urls
    return str(spec)


class SkipCounter:
    """A webdataset error handler that logs and counts what it skips (per process).

    A truncated or unreadable tar reaches the handler more than once (webdataset reports it from its member
    iterator and again from its shard expander): it counts once per shard.
    """

    def __init__(self) -> None:
        self.count = 0
        self.broken_shards: set[str] = set()

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, tarfile.TarError):
            m = re.search(r"name='([^']+)'", str(exn))
            shard = m.group(1) if m else str(exn)
            if shard in self.broken_shards:
                return True
            self.broken_shards.add(shard)
        self.count += 1
        log.warning("skipped a sample or shard (%d so far in this process): %s: %s", self.count, type(exn).__name__, exn)
        return True

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


class PretrainSample:
    """Turns one decoded webdataset sample into model inputs (a picklable callable for DataLoader workers)."""

    def __init__(self, tokenizer: Any, data: PretrainDataConfig, model: BEiT3Config, seed: int, augment: bool = True) -> None:
        self.tokenizer = tokenizer
        self.data, self.max_text_len = data, model.max_text_len
        self.transform = train_transform(model.img_size) if augment else eval_transform(model.img_size)
        grid = model.img_size // model.patch_size
        self.masking = BlockMasking((grid, grid), max(1, round(data.mask_ratio * grid * grid)),
                                    min_block=min(data.min_block, grid * grid // 4 or 1))
        self.special = set(tokenizer.all_special_ids)
        self.seed = seed

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            raise KeyError(f"sample {key!r} in {sample.get('__url__', '?')}: no image ({'/'.join(IMAGE_EXTS)})")
        caption = sample.get("txt")
        if not isinstance(caption, str) or not caption.strip():
            raise KeyError(f"sample {key!r} in {sample.get('__url__', '?')}: missing or empty caption (.txt)")
        # randomness from (seed, url, key) alone: the same sample gets the same crop and masks however the
        # stream was split over ranks and workers, and after a resume
        rng = random.Random(seed_of(self.seed, sample.get("__url__"), key))
        ids = self.tokenizer(caption.strip(), truncation=True, max_length=self.max_text_len)["input_ids"]
        inputs, labels = mask_text(ids, special_ids=self.special, mask_id=self.tokenizer.mask_token_id,
                                   vocab_size=len(self.tokenizer), rng=rng, prob=self.data.mlm_prob)
        image = seeded(self.transform, image.convert("RGB"), self.seed, sample.get("__url__"), key)
        return {"key": key, "image": image, "text_ids": ids, "masked_ids": inputs, "mlm_labels": labels,
                "patch_mask": self.masking(rng)}


class Collate:
    """Stacks samples into a batch dict and reports this worker's skipped-sample count since the last batch."""

    def __init__(self, pad_id: int, skips: SkipCounter) -> None:
        self.pad_id = pad_id
        self.skips = skips

    def __call__(self, samples: list[dict]) -> dict:
        text_ids = pad([s["text_ids"] for s in samples], self.pad_id)
        return {
            "keys": [s["key"] for s in samples],
            "images": torch.stack([s["image"] for s in samples]),
            "text_ids": text_ids,
            "masked_ids": pad([s["masked_ids"] for s in samples], self.pad_id),
            "text_padding": text_ids == self.pad_id,
            "mlm_labels": pad([s["mlm_labels"] for s in samples], IGNORE_INDEX),
            "patch_mask": torch.stack([s["patch_mask"] for s in samples]),
            "num_skipped": self.skips.take(),
        }


def pretrain_dataset(urls: str | list[str], tokenizer: Any, data: PretrainDataConfig, model: BEiT3Config,
                     batch_size: int, *, resampled: bool = False, seed: int = 0, augment: bool = True) -> wds.WebDataset:
    """The batched pretraining pipeline over shard `urls` (brace notation or a list), at the model's image size
    and text length."""
    skips = SkipCounter()
    ds = wds.WebDataset(urls, handler=skips, resampled=resampled, shardshuffle=False if resampled else 100,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, seed=seed,
                        empty_check=False)
    return (ds.shuffle(data.shuffle_buffer, seed=seed)
            .decode("pil", handler=skips)
            .map(PretrainSample(tokenizer, data, model, seed, augment), handler=skips)
            .batched(batch_size, collation_fn=Collate(tokenizer.pad_token_id, skips), partial=not resampled))


def pretrain_loader(urls: str | list[str], tokenizer: Any, data: PretrainDataConfig, model: BEiT3Config,
                    batch_size: int, *, num_workers: int = 0, seed: int = 0, augment: bool = True,
                    worker_init_fn: Callable | None = None) -> wds.WebLoader:
    """A WebLoader of batches; with `data.epoch_batches` shards are resampled and every epoch (and rank) has that
    many batches."""
    resampled = data.epoch_batches is not None
    ds = pretrain_dataset(urls, tokenizer, data, model, batch_size, resampled=resampled, seed=seed, augment=augment)
    loader = wds.WebLoader(ds, batch_size=None, num_workers=num_workers, worker_init_fn=worker_init_fn,
                           persistent_workers=num_workers > 0)
    return loader.with_epoch(data.epoch_batches) if resampled else loader


def first_batches(shards: str | Path, tokenizer: Any, model: BEiT3Config, n: int, batch_size: int = 32, seed: int = 0,
                  shuffle_buffer: int = 10) -> list[dict]:
    """The first `n` un-augmented pretraining batches (masks included) of webdataset shards (for evaluation)."""
    data = PretrainDataConfig(shuffle_buffer=shuffle_buffer)
    batches = []
    for b in pretrain_loader(shard_urls(shards), tokenizer, data, model, batch_size, seed=seed, augment=False):
        batches.append(b)
        if len(batches) == n:
            break
    return batches
