"""Per task: the model, a deterministic loader(epoch) and the loss function, as a `Task` for the trainer.

pretrain: masked multimodal modeling on webdataset shards of image-text pairs. Every step combines
  masked language modeling on the text alone, masked image modeling on the image alone, and masked
  vision-language modeling (masked text given the full image), weighted by `objectives`.
finetune vqa | nlvr2 | caption: the official-format datasets of mm_moe.data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mm_moe.config import InputError, ObjectivesConfig, RunConfig
from mm_moe.data.coco import CaptionDataset
from mm_moe.data.common import epoch_loader, epoch_seed
from mm_moe.data.masking import mask_caption
from mm_moe.data.nlvr2 import NLVR2Dataset
from mm_moe.data.shards import pretrain_loader, shard_urls
from mm_moe.data.transforms import train_transform
from mm_moe.data.vqa import AnswerVocab, VQADataset
from mm_moe.engine.trainer import Task
from mm_moe.model import BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForPretraining, BEiT3ForVQA, TaskOutput


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


def pretrain_loss(weights: ObjectivesConfig) -> Callable[[nn.Module, dict], TaskOutput]:
    """MLM on text alone, MIM on images alone, VLM on the pairs; one summed loss (+ aux of every pass)."""

    def loss_fn(model: nn.Module, batch: dict) -> TaskOutput:
        losses, aux, stats, logits = {}, 0.0, {}, None
        passes = {
            "mlm": dict(text_ids=batch["masked_ids"], text_padding=batch["text_padding"], mlm_labels=batch["mlm_labels"]),
            "mim": dict(images=batch["images"], patch_mask=batch["patch_mask"]),
            "vlm": dict(images=batch["images"], text_ids=batch["masked_ids"], text_padding=batch["text_padding"],
                        mlm_labels=batch["mlm_labels"]),
        }
        for name, kwargs in passes.items():
            if not getattr(weights, name):
                continue
            out = model(**kwargs)
            losses[name] = next(iter(out.losses.values()))
            aux = aux + out.aux_loss
            stats = stats or out.stats
            logits = out.logits
        total = sum(getattr(weights, k) * v for k, v in losses.items()) + aux
        return TaskOutput(logits, total, aux, stats, losses)

    return loss_fn


def build_pretrain(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """Pretraining model and loader; rank `rank` of `world` reads its own shards (or resamples them)."""
    d, t = cfg.pretrain_data, cfg.train
    urls = shard_urls(d.shards, need=None if d.epoch_batches else world * max(1, t.num_workers))

    def loader(epoch: int):
        return pretrain_loader(urls, tokenizer, d, cfg.model, t.batch_size, num_workers=t.num_workers,
                               seed=epoch_seed(t.seed, epoch), rank=rank, world=world)

    return Task(BEiT3ForPretraining(cfg.model), loader, pretrain_loss(cfg.objectives), encoder_tokens(cfg.model.patch_size),
                source=f"pretrain_data.shards={d.shards}")


def build_finetune(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The model (fresh head), loader and loss of the fine-tuning task `cfg.task`."""
    d, m, t = cfg.data, cfg.model, cfg.train
    train_tf = train_transform(m.img_size, min_scale=0.8)
    tokens = encoder_tokens(m.patch_size)

    def loader(ds: Any, source: str) -> Callable[[int], Any]:
        if len(ds) // world < t.batch_size:  # full batches only: an epoch would be empty
            raise InputError(f"{source}: {len(ds)} samples over {world} process(es) make no full batch of "
                             f"train.batch_size={t.batch_size}")
        return lambda epoch: epoch_loader(ds, t.batch_size, ds.collate, seed=t.seed, epoch=epoch,
                                          num_workers=t.num_workers, rank=rank, world=world)

    if cfg.task == "vqa":
        vocab = AnswerVocab.build(d.vqa_train_annotations, d.answer_min_count)
        if not len(vocab):
            raise InputError(f"data.vqa_train_annotations={d.vqa_train_annotations}: no answer occurs "
                             f"{d.answer_min_count}+ times")
        ds = VQADataset(d.vqa_train_questions, d.vqa_images, tokenizer, train_tf, d.vqa_train_annotations, vocab,
                        m.max_text_len)
        source = f"data.vqa_train_questions={d.vqa_train_questions}"
        return Task(BEiT3ForVQA(m, len(vocab)), loader(ds, source),
                    lambda model, b: model(b["images"], b["text_ids"], b["text_padding"], b["targets"]), tokens, vocab,
                    source)
    if cfg.task == "nlvr2":
        ds = NLVR2Dataset(d.nlvr2_train, d.nlvr2_images, tokenizer, train_tf, m.max_text_len)
        source = f"data.nlvr2_train={d.nlvr2_train}"
        return Task(BEiT3ForNLVR2(m), loader(ds, source),
                    lambda model, b: model(b["images_left"], b["images_right"], b["text_ids"], b["text_padding"],
                                           b["labels"]), tokens, source=source)
    if cfg.task == "caption":
        ds = CaptionDataset(d.karpathy, d.coco_images, tokenizer, train_tf, max_text_len=m.max_text_len)
        never = set(tokenizer.all_special_ids) - {tokenizer.sep_token_id}  # [SEP] ends a caption: it is predicted too

        def loss_fn(model: nn.Module, b: dict) -> TaskOutput:
            inputs, labels = mask_caption(b["text_ids"], b["text_padding"], d.caption_mask_prob,
                                          tokenizer.mask_token_id, never, b["mask_seeds"])
            return model(b["images"], inputs, b["text_padding"], labels)

        source = f"data.karpathy={d.karpathy}"
        return Task(BEiT3ForCaptioning(m), loader(ds, source), loss_fn, tokens, source=source)
    raise ValueError(f"build_finetune: task {cfg.task!r} is not a fine-tuning task (vqa, nlvr2, caption)")


def build_task(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The Task of `cfg.task`."""
    build = build_pretrain if cfg.task == "pretrain" else build_finetune
    return build(cfg, tokenizer, rank, world)


__all__ = ["encoder_tokens", "pretrain_loss", "build_pretrain", "build_finetune", "build_task"]
