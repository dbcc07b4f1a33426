"""Pretraining: masked multimodal modeling on webdataset shards of image-text pairs. Every step combines masked
language modeling on the text alone, masked image modeling on the image alone, and masked vision-language modeling
(masked text given the full image), weighted by `objectives`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mm_moe.config import ObjectivesConfig, RunConfig
from mm_moe.data.common import epoch_seed
from mm_moe.data.shards import pretrain_loader, shard_urls
from mm_moe.data.stream import IndexedEpoch, RankBatches, ShardIndex, local_shards
from mm_moe.engine.tasks.common import encoder_tokens
from mm_moe.engine.trainer import Task
from mm_moe.errors import ConfigError
from mm_moe.model import BEiT3ForPretraining, TaskOutput
from mm_moe.moe.stats import merge_stats


def pretrain_loss(weights: ObjectivesConfig) -> Callable[..., TaskOutput]:
    """MLM on text alone, MIM on images alone, VLM on the pairs with text masks of their own (BEiT-3: 15% and 50%);
    one summed loss (+ aux of every pass). With `stats`, the routing statistics of every MoE layer over all three
    passes (the vision branches see the MIM and VLM passes' image tokens, the language branches the MLM and VLM
    passes' text)."""

    def loss_fn(model: nn.Module, batch: dict, stats: bool = False) -> TaskOutput:
        losses, aux, layer_stats, logits = {}, 0.0, {}, None
        # the MLM and MIM passes take monomodal texts / images where the batch has them (`MonomodalMix`)
        passes = {
            "mlm": dict(text_ids=batch["mlm_text_ids"], text_padding=batch["mlm_text_padding"],
                        mlm_labels=batch["mlm_text_labels"]) if "mlm_text_ids" in batch else
            dict(text_ids=batch["masked_ids"], text_padding=batch["text_padding"], mlm_labels=batch["mlm_labels"]),
            "mim": dict(images=batch.get("mim_images", batch["images"]),
                        patch_mask=batch.get("mim_patch_mask", batch["patch_mask"])),
            "vlm": dict(images=batch["images"], text_ids=batch["vlm_ids"], text_padding=batch["text_padding"],
                        mlm_labels=batch["vlm_labels"]),
        }
        for name, kwargs in passes.items():
            if not getattr(weights, name):
                continue
            out = model(**kwargs, stats=stats)
            losses[name] = next(iter(out.losses.values()))
            aux = aux + out.aux_loss
            layer_stats = merge_stats(layer_stats, out.stats)
            logits = out.logits
        total = sum(getattr(weights, k) * v for k, v in losses.items()) + aux
        return TaskOutput(logits, total, aux, layer_stats, losses)

    return loss_fn


def build(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """Pretraining model and loader. Local shards are read by global position (`mm_moe.data.stream`): the same
    batches at any world size, worker count and accumulation split. Remote ones (http, pipe:) are streamed, each
    rank reading its own shards (or resampling them, `pretrain_data.epoch_batches`)."""
    d, t = cfg.pretrain_data, cfg.train
    urls = shard_urls(d.shards)
    extra = {part: spec for part, spec in (("image", d.image_shards), ("text", d.text_shards)) if spec}
    if local_shards(urls):
        if d.epoch_batches is not None:
            raise ConfigError("pretrain_data.epoch_batches: only for remote (streamed) shards; local shards are read "
                              "by global position and an epoch is one pass over all their samples")
        index = ShardIndex(urls)
        monomodal = {}
        for part, spec in extra.items():
            key = f"pretrain_data.{part}_shards"
            mono_urls = shard_urls(spec, key=key)
            if not local_shards(mono_urls):
                raise ConfigError(f"{key}={spec}: monomodal shards must be local files (they are read by position)")
            monomodal[part] = ShardIndex(mono_urls, key=key)

        def loader(epoch: int) -> IndexedEpoch:
            return IndexedEpoch(RankBatches(index, tokenizer, d, cfg.model, batch_size=t.batch_size, seed=t.seed,
                                            epoch=epoch, rank=rank, world=world, accum=t.grad_accum,
                                            monomodal=monomodal), t.num_workers)
    else:
        if extra:
            raise ConfigError("pretrain_data.image_shards / text_shards: only beside local pair shards (read by "
                              f"position), not streamed ones ({d.shards})")
        urls = shard_urls(d.shards, need=None if d.epoch_batches else world * max(1, t.num_workers))

        def loader(epoch: int):
            return pretrain_loader(urls, tokenizer, d, cfg.model, t.batch_size, num_workers=t.num_workers,
                                   seed=epoch_seed(t.seed, epoch), rank=rank, world=world)

    return Task(model=BEiT3ForPretraining(cfg.model), loader=loader, loss_fn=pretrain_loss(cfg.objectives),
                tokens=encoder_tokens(cfg.model.patch_size), source=f"pretrain_data.shards={d.shards}")


__all__ = ["pretrain_loss", "build"]
