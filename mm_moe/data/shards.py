"""Pretraining data from webdataset shards of {key}.jpg|png, {key}.txt, {key}.json samples.

shuffle -> decode -> torchvision v2 transform -> tokenise + MLM masking -> BEiT block masking -> batches.
This module streams shards (the reader of remote ones, and of `first_batches`); local shards are read by global
position (`mm_moe.data.stream`) with the same sample preparation and collation. Streamed, each rank reads its own
shards and each DataLoader worker its own share of them; with `epoch_batches` shards are resampled instead, and
every epoch of every rank has that many batches.
A corrupt image, a sample without caption or a truncated tar is skipped, logged and counted: each batch
carries `num_skipped`, the samples its worker skipped since its previous batch.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand

from mm_moe.config import BEiT3Config, PretrainDataConfig
from mm_moe.constants import IGNORE_INDEX
from mm_moe.data.common import pad, to_rgb
from mm_moe.data.masking import BlockMasking, mask_text
from mm_moe.data.skips import SampleError, SkipCounter
from mm_moe.data.transforms import eval_transform, seed_of, seeded, train_transform
from mm_moe.errors import InputError

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_urls(spec: str | Path, need: int | None = None, key: str = "pretrain_data.shards") -> list[str]:
    """The shards of a directory (its .tar files) or of a brace pattern ("shards/coco-{000000..000127}.tar").

    Local shards must exist (a typo in a pattern is an error, not an empty run) and at least one must be a tar
    archive; `need`: how many shards are required (ranks x workers, when shards are split, not resampled);
    `key`: the config key errors name."""
    if not str(spec):
        raise InputError(f"{key}: empty; expected a directory or a brace pattern of .tar shards")
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise InputError(f"{key}={spec}: no .tar shards in this directory")
    else:
        urls = list(braceexpand(str(spec)))
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise InputError(f"{key}={spec}: {len(missing)} of {len(urls)} shard(s) do not exist "
                         f"(e.g. {', '.join(missing[:3])})")
    not_tar = [u for u in local if not tarfile.is_tarfile(u)]
    if local and len(not_tar) == len(urls):
        raise InputError(f"{key}={spec}: no shard is a tar archive (e.g. {', '.join(not_tar[:3])})")
    if not_tar:
        log.warning("%s: %d shard(s) are not tar archives and will be skipped: %s", spec, len(not_tar), not_tar[:3])
    if need is not None and len(urls) < need:
        raise InputError(f"{key}={spec}: {len(urls)} shard(s) for {need} readers (processes x "
                         "train.num_workers), each needs its own: write more shards (make_shards.py --max-count) "
                         "or resample them (pretrain_data.epoch_batches)")
    return urls


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

    def __call__(self, sample: dict, part: str = "pair") -> dict:
        try:
            return self.prepare(sample, part)
        except Exception as err:
            cause = str(err) if type(err) is SampleError else f"{type(err).__name__}: {err}"
            raise SampleError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}: {cause}") from err

    def prepare(self, sample: dict, part: str = "pair") -> dict:
        """`part`: "pair" (an image and its caption, for every pass), "image" (an image alone, for the MIM pass) or
        "text" (a text alone, for the MLM pass)."""
        key = sample.get("__key__", "?")
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None and part != "text":
            raise SampleError(f"no image ({'/'.join(IMAGE_EXTS)})")
        caption = sample.get("txt")
        if part != "image" and (not isinstance(caption, str) or not caption.strip()):
            raise SampleError("missing or empty caption (.txt)" if part == "pair" else "missing or empty text (.txt)")
        # randomness from (seed, shard file name, key) alone: the same sample gets the same crop and masks however
        # the stream was split over ranks and workers, after a resume, and wherever the shards are (not the path);
        # a monomodal source's samples also by their part, apart from pairs of the same shard name and key
        shard = Path(str(sample.get("__url__", "?"))).name
        where = (shard, key) if part == "pair" else (part, shard, key)
        rng = random.Random(seed_of(self.seed, *where))
        out: dict = {"key": key}
        if part != "image":
            ids = self.tokenizer(caption.strip(), truncation=True, max_length=self.max_text_len)["input_ids"]
            passes = (("mlm", self.data.mlm_prob), ("vlm", self.data.vlm_prob))[:2 if part == "pair" else 1]
            masks = {pass_: mask_text(ids, special_ids=self.special, mask_id=self.tokenizer.mask_token_id,
                                      vocab_size=len(self.tokenizer), rng=rng, prob=prob)  # one draw after the other
                     for pass_, prob in passes}
            out |= {"text_ids": ids, "masked_ids": masks["mlm"][0], "mlm_labels": masks["mlm"][1]}
            if part == "pair":
                out |= {"vlm_ids": masks["vlm"][0], "vlm_labels": masks["vlm"][1]}
        if part != "text":
            out |= {"image": seeded(self.transform, to_rgb(image), self.seed, *where), "patch_mask": self.masking(rng)}
        return out


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
            "vlm_ids": pad([s["vlm_ids"] for s in samples], self.pad_id),
            "vlm_labels": pad([s["vlm_labels"] for s in samples], IGNORE_INDEX),
            "patch_mask": torch.stack([s["patch_mask"] for s in samples]),
            "num_skipped": self.skips.take(),
        }


def _report_if_empty(skips: SkipCounter) -> Callable:
    """A pipeline stage that passes batches on; a stream that ends without one yields instead a report of this
    reader's first failures (for `EpochBatches` to name in its error)."""

    def stage(batches):
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            yield {"no_batch": skips.first}

    return stage


class EpochBatches:
    """One epoch of a rank's batches; an epoch in which no reader (process or DataLoader worker) made a batch is
    an InputError naming the shards and the first failures."""

    def __init__(self, loader: Any, source: str, rank: int) -> None:
        self.loader, self.source, self.rank = loader, source, rank

    def __iter__(self):
        failures, batches = [], 0
        for batch in self.loader:
            if "no_batch" in batch:
                failures += batch["no_batch"]
                continue
            batches += 1
            yield batch
        if not batches:
            raise InputError(f"pretrain_data.shards={self.source}: no sample could be read in this epoch (rank "
                             f"{self.rank}); first failures: {'; '.join(failures[:3]) or 'none (no sample at all)'}")


def describe_shards(urls: list[str]) -> str:
    """Shard list for messages: all of a short list, the first and the count of a long one."""
    return ",".join(urls) if len(urls) <= 3 else f"{urls[0]} ... ({len(urls)} shards)"


def _worker_seed(rank: int) -> int:
    """A distinct shard-resampling seed for each (rank, DataLoader worker)."""
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def pretrain_dataset(urls: list[str], tokenizer: Any, data: PretrainDataConfig, model: BEiT3Config, batch_size: int, *,
                     resampled: bool = False, seed: int = 0, augment: bool = True, rank: int = 0,
                     world: int = 1) -> wds.DataPipeline:
    """The batched pretraining pipeline of rank `rank` of `world` over shard `urls`, at the model's image size
    and text length: shards shuffled by `seed` then dealt out (rank r takes every world-th, each DataLoader
    worker its share), or, `resampled`, drawn with replacement from a (seed, rank, worker) stream."""
    skips = SkipCounter(describe_shards(urls), patience=10_000 if resampled else None)
    if resampled:
        shards = [wds.ResampledShards(urls, seed=seed, worker_seed=partial(_worker_seed, rank), deterministic=True,
                                      empty_check=False)]
    else:
        order = list(urls)
        random.Random(seed).shuffle(order)
        shards = [wds.SimpleShardList(order[rank::world]), wds.split_by_worker]
    return wds.DataPipeline(
        *shards,
        wds.tarfile_to_samples(handler=skips),
        wds.shuffle(data.shuffle_buffer, seed=seed),
        wds.decode("pil", handler=skips),
        wds.map(PretrainSample(tokenizer, data, model, seed, augment), handler=skips),
        wds.batched(batch_size, collation_fn=Collate(tokenizer.pad_token_id, skips), partial=not resampled),
        _report_if_empty(skips),
    )


def pretrain_loader(urls: list[str], tokenizer: Any, data: PretrainDataConfig, model: BEiT3Config, batch_size: int, *,
                    num_workers: int = 0, seed: int = 0, augment: bool = True, rank: int = 0, world: int = 1,
                    worker_init_fn: Callable | None = None) -> EpochBatches:
    """Rank `rank`'s batches of one epoch; with `data.epoch_batches` shards are resampled and every epoch (and
    rank) has that many batches."""
    resampled = data.epoch_batches is not None
    ds = pretrain_dataset(urls, tokenizer, data, model, batch_size, resampled=resampled, seed=seed, augment=augment,
                          rank=rank, world=world)
    loader = wds.WebLoader(ds, batch_size=None, num_workers=num_workers, worker_init_fn=worker_init_fn,
                           persistent_workers=num_workers > 0)
    return EpochBatches(loader.with_epoch(data.epoch_batches) if resampled else loader, describe_shards(urls), rank)


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
