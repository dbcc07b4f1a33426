"""Run configs and the per-task pieces the trainer needs: model, deterministic loader(epoch), step(model, batch).

pretrain: masked multimodal modeling on webdataset shards of image-text pairs. Every step combines
  masked language modeling on the text alone, masked image modeling on the image alone, and masked
  vision-language modeling (masked text given the full image), weighted by `objectives`.
finetune vqa | nlvr2 | caption: the official-format datasets of mm_moe.data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from mm_moe.config import from_dict
from mm_moe.data.coco import CaptionDataset
from mm_moe.data.nlvr2 import NLVR2Dataset
from mm_moe.data.shards import PretrainDataConfig, pretrain_loader
from mm_moe.data.transforms import train_transform
from mm_moe.data.vqa import AnswerVocab, VQADataset
from mm_moe.engine.checkpoint import load_config_dict, resolve_checkpoint
from mm_moe.engine.optim import OptimConfig
from mm_moe.engine.trainer import TrainConfig
from mm_moe.model import BEiT3Config, BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForPretraining, BEiT3ForVQA, TaskOutput


@dataclass
class Objectives:
    mlm: float = 1.0  # masked language modeling, text only
    mim: float = 1.0  # masked image modeling, image only
    vlm: float = 1.0  # masked vision-language modeling: masked text given the image


@dataclass
class PretrainData:
    shards: str = ""  # brace pattern or directory of .tar shards
    mlm_prob: float = 0.15
    mask_ratio: float = 0.4
    min_block: int = 16
    shuffle_buffer: int = 1000
    epoch_batches: int | None = None  # resampled shards, this many batches per epoch and rank (use under DDP)


@dataclass
class TaskData:
    # VQA v2
    vqa_train_questions: str = ""
    vqa_train_annotations: str = ""
    vqa_val_questions: str = ""
    vqa_val_annotations: str = ""
    vqa_images: str = ""
    answer_min_count: int = 9
    # NLVR2
    nlvr2_train: str = ""
    nlvr2_dev: str = ""
    nlvr2_images: str = ""
    # COCO Karpathy captions
    karpathy: str = ""
    coco_images: str = ""
    caption_mask_prob: float = 0.6


@dataclass
class RunConfig:
    model: BEiT3Config = field(default_factory=BEiT3Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objectives: Objectives = field(default_factory=Objectives)
    pretrain_data: PretrainData = field(default_factory=PretrainData)
    data: TaskData = field(default_factory=TaskData)
    task: str = "pretrain"  # pretrain | vqa | nlvr2 | caption (set by train_mm.py)
    run_dir: str = "runs/default"


@dataclass
class Task:
    model: nn.Module
    loader: Callable[[int], Any]
    step: Callable[[nn.Module, dict], TaskOutput]
    extra: dict = field(default_factory=dict)  # e.g. the answer vocabulary


def load_run_config(ckpt: str | Path) -> RunConfig:
    """The resolved RunConfig saved with a checkpoint (or a run's latest checkpoint)."""
    path = resolve_checkpoint(ckpt)
    return from_dict(RunConfig, load_config_dict(path), where=str(path / "config.yaml"))


def shard_urls(spec: str) -> str | list[str]:
    """A directory means every .tar inside it; anything else is passed to webdataset as is."""
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{spec}: no .tar shards in this directory")
        return urls
    return spec


def map_loader(ds: Dataset, batch_size: int, cfg: TrainConfig, collate: Callable, epoch: int, rank: int = 0,
               world: int = 1, shuffle: bool = True) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): exact resume by skipping batches.

    Under DDP every rank takes a disjoint stride of the same permutation (equal batch counts: the tail is dropped).
    """
    ds.set_epoch(cfg.seed, epoch)  # augmentation from (seed, epoch, index): exact after a resume, any worker count
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = list(RandomSampler(ds, generator=g)) if shuffle else list(range(len(ds)))
    if world > 1:
        per_rank = len(order) // world
        order = order[rank * per_rank:(rank + 1) * per_rank]
    return DataLoader(ds, batch_size=batch_size, sampler=order, collate_fn=collate, num_workers=cfg.num_workers,
                      generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1), drop_last=shuffle)


def pretrain_step(weights: Objectives) -> Callable[[nn.Module, dict], TaskOutput]:
    """MLM on text alone, MIM on images alone, VLM on the pairs; one summed loss (+ aux of every pass)."""

    def step(model: nn.Module, batch: dict) -> TaskOutput:
        losses, aux, stats, logits = {}, 0.0, {}, None
        passes = {
            "mlm": dict(text_ids=batch["masked_ids"], text_padding=batch["text_padding"], mlm_labels=batch["mlm_labels"]),
            "mim": dict(images=batch["images"], patch_mask=batch["patch_mask"]),
            "vlm": dict(images=batch["images"], text_ids=batch["masked_ids"], text_padding=batch["text_padding"],
                        mlm_labels=batch["mlm_labels"]),
        }
        for name, kwargs in passes.items():
            w = getattr(weights, name)
            if not w:
                continue
            out = model(**kwargs)
            losses[name] = next(iter(out.losses.values()))
            aux = aux + out.aux_loss
            stats = stats or out.stats
            logits = out.logits
        total = sum(getattr(weights, k) * v for k, v in losses.items()) + aux
        return TaskOutput(logits, total, aux, stats, losses)

    return step


def build_pretrain(cfg: RunConfig, tokenizer: Any) -> Task:
    """Pretraining model and loader; ranks split the shards themselves (webdataset split_by_node)."""
    d = cfg.pretrain_data
    data_cfg = PretrainDataConfig(img_size=cfg.model.img_size, patch_size=cfg.model.patch_size,
                                  max_text_len=cfg.model.max_text_len, mlm_prob=d.mlm_prob, mask_ratio=d.mask_ratio,
                                  min_block=d.min_block, shuffle_buffer=d.shuffle_buffer)
    urls = shard_urls(d.shards)

    def loader(epoch: int):
        return pretrain_loader(urls, tokenizer, data_cfg, cfg.train.batch_size, num_workers=cfg.train.num_workers,
                               epoch_batches=d.epoch_batches, seed=cfg.train.seed * 100_003 + epoch)

    return Task(BEiT3ForPretraining(cfg.model), loader, pretrain_step(cfg.objectives))


def mask_caption(batch: dict, prob: float, mask_id: int, never: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BEiT-3 captioning targets: each real token not in `never` is masked with `prob` (at least one per caption)."""
    ids = batch["text_ids"]
    can = ~batch["text_padding"] & ~torch.isin(ids, torch.tensor(sorted(never), device=ids.device))
    chosen = (torch.rand(ids.shape, device=ids.device) < prob) & can
    first = can.float().argmax(1)  # rows with nothing chosen get their first candidate
    none = ~chosen.any(1)
    chosen[none, first[none]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return torch.where(chosen, torch.full_like(ids, mask_id), ids), labels


def build_finetune(task: str, cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The model (fresh head), loaders and step of a fine-tuning task."""
    d, m, t = cfg.data, cfg.model, cfg.train
    train_tf = train_transform(m.img_size, min_scale=0.8)

    def loader(ds: Any) -> Callable[[int], DataLoader]:
        return lambda epoch: map_loader(ds, t.batch_size, t, ds.collate, epoch, rank, world)

    if task == "vqa":
        vocab = AnswerVocab.build([d.vqa_train_annotations], d.answer_min_count)
        if not len(vocab):
            raise ValueError(f"{d.vqa_train_annotations}: no answer occurs {d.answer_min_count}+ times")
        ds = VQADataset(d.vqa_train_questions, d.vqa_images, tokenizer, train_tf, d.vqa_train_annotations, vocab,
                        m.max_text_len)
        return Task(BEiT3ForVQA(m, len(vocab)), loader(ds),
                    lambda model, b: model(b["images"], b["text_ids"], b["text_padding"], b["targets"]), {"vocab": vocab})
    if task == "nlvr2":
        ds = NLVR2Dataset(d.nlvr2_train, d.nlvr2_images, tokenizer, train_tf, m.max_text_len)
        return Task(BEiT3ForNLVR2(m), loader(ds),
                    lambda model, b: model(b["images_left"], b["images_right"], b["text_ids"], b["text_padding"],
                                           b["labels"]))
    if task == "caption":
        ds = CaptionDataset(d.karpathy, d.coco_images, tokenizer, train_tf, max_text_len=m.max_text_len)
        never = set(tokenizer.all_special_ids) - {tokenizer.sep_token_id}  # [SEP] ends a caption: it is predicted too

        def step(model: nn.Module, b: dict) -> TaskOutput:
            inputs, labels = mask_caption(b, d.caption_mask_prob, tokenizer.mask_token_id, never)
            return model(b["images"], inputs, b["text_padding"], labels)

        return Task(BEiT3ForCaptioning(m), loader(ds), step)
    raise ValueError(f"unknown fine-tuning task {task!r}: expected vqa, nlvr2 or caption")


def eval_vqa_predictions(model: BEiT3ForVQA, ds: VQADataset, vocab: AnswerVocab, batch_size: int,
                         device: torch.device) -> list[dict]:
    """[{"question_id", "answer"}] for every question of `ds` (argmax over the answer vocabulary)."""
    model.eval()
    results = []
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate)
    with torch.no_grad():
        for b in tqdm(loader, desc="vqa eval", unit="batch", leave=False):
            logits = model(b["images"].to(device), b["text_ids"].to(device), b["text_padding"].to(device)).logits
            results += [{"question_id": q, "answer": vocab.answers[i]} for q, i in zip(b["question_ids"],
                                                                                      logits.argmax(1).tolist(), strict=True)]
    return results


def eval_nlvr2(model: BEiT3ForNLVR2, ds: NLVR2Dataset, batch_size: int, device: torch.device) -> list[tuple[str, bool]]:
    """(identifier, predicted truth) for every statement of `ds`."""
    model.eval()
    out = []
    with torch.no_grad():
        for b in tqdm(DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate), desc="nlvr2 eval", leave=False):
            logits = model(b["images_left"].to(device), b["images_right"].to(device), b["text_ids"].to(device),
                           b["text_padding"].to(device)).logits
            out += list(zip(b["identifiers"], (logits.argmax(1) == 1).tolist(), strict=True))
    return out
