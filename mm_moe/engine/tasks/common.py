"""What the task builders share: token counting for throughput, and the loader of the fine-tuning datasets."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from mm_moe.config import RunConfig
from mm_moe.data.common import epoch_loader
from mm_moe.errors import InputError


def encoder_tokens(patch_size: int) -> Callable[[dict], int]:
    """Tokens the encoder processes for one pass over a batch: image patches + [CLS] and real text tokens."""

    def count(batch: dict) -> int:
        n = 0
        for key in ("images", "images_left", "images_right"):
            if key in batch:
                h, w = batch[key].shape[-2:]
                n += batch[key].shape[0] * (1 + (h // patch_size) * (w // patch_size))
        if "text_padding" in batch:
            n += int((~batch["text_padding"]).sum())
        return n

    return count


def finetune_loader(cfg: RunConfig, ds: Any, source: str, rank: int, world: int) -> Callable[[int], Iterable[dict]]:
    """loader(epoch) of a fine-tuning dataset: this rank's stride of an order drawn from (seed, epoch)."""
    t = cfg.train
    if len(ds) // world < t.batch_size:  # full batches only: an epoch would be empty
        raise InputError(f"{source}: {len(ds)} samples over {world} process(es) make no full batch of "
                         f"train.batch_size={t.batch_size}")
    return lambda epoch: epoch_loader(ds, t.batch_size, ds.collate, seed=t.seed, epoch=epoch,
                                      num_workers=t.num_workers, rank=rank, world=world)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["encoder_tokens", "finetune_loader", "model_device"]
