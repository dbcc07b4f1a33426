"""Per task: the model, a deterministic loader(epoch) and the loss function, as a `Task` for the trainer.

pretrain: masked multimodal modeling on webdataset shards of image-text pairs. Every step combines
  masked language modeling on the text alone, masked image modeling on the image alone, and masked
  vision-language modeling (masked text given the full image), weighted by `objectives`.
finetune vqa | nlvr2 | caption: the official-format datasets of mm_moe.data.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_moe.config import InputError, ObjectivesConfig, RunConfig
from mm_moe.data.coco import CaptionDataset, write_coco_gt
from mm_moe.data.common import epoch_loader, epoch_seed
from mm_moe.data.masking import mask_caption
from mm_moe.data.nlvr2 import NLVR2Dataset
from mm_moe.data.shards import pretrain_loader, shard_urls
from mm_moe.data.tokenizer import check_tokenizer
from mm_moe.data.transforms import eval_transform, train_transform
from mm_moe.data.vqa import AnswerVocab, VQADataset
from mm_moe.engine.trainer import Task
from mm_moe.eval import (
    BeamConfig,
    evaluate_captions,
    evaluate_vqa,
    nlvr2_metrics,
    nlvr2_predictions,
    vqa_predictions,
    write_predictions,
)
from mm_moe.eval.vqa_metric import read_annotations
from mm_moe.model import BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForPretraining, BEiT3ForVQA, TaskOutput
from mm_moe.moe.stats import merge_stats


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


def pretrain_loss(weights: ObjectivesConfig) -> Callable[..., TaskOutput]:
    """MLM on text alone, MIM on images alone, VLM on the pairs; one summed loss (+ aux of every pass). With
    `stats`, the routing statistics of every MoE layer over all three passes (the vision branches see the MIM and
    VLM passes' image tokens, the language branches the MLM and VLM passes' text)."""

    def loss_fn(model: nn.Module, batch: dict, stats: bool = False) -> TaskOutput:
        losses, aux, layer_stats, logits = {}, 0.0, {}, None
        passes = {
            "mlm": dict(text_ids=batch["masked_ids"], text_padding=batch["text_padding"], mlm_labels=batch["mlm_labels"]),
            "mim": dict(images=batch["images"], patch_mask=batch["patch_mask"]),
            "vlm": dict(images=batch["images"], text_ids=batch["masked_ids"], text_padding=batch["text_padding"],
                        mlm_labels=batch["mlm_labels"]),
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


def build_pretrain(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """Pretraining model and loader; rank `rank` of `world` reads its own shards (or resamples them)."""
    d, t = cfg.pretrain_data, cfg.train
    urls = shard_urls(d.shards, need=None if d.epoch_batches else world * max(1, t.num_workers))

    def loader(epoch: int):
        return pretrain_loader(urls, tokenizer, d, cfg.model, t.batch_size, num_workers=t.num_workers,
                               seed=epoch_seed(t.seed, epoch), rank=rank, world=world)

    return Task(BEiT3ForPretraining(cfg.model), loader, pretrain_loss(cfg.objectives), encoder_tokens(cfg.model.patch_size),
                source=f"pretrain_data.shards={d.shards}")


Evaluator = Callable[[nn.Module, Path | None], dict[str, float]]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_annotations(path: str, questions: list[dict], key: str) -> None:
    """The VQA annotations file that scores `questions`: readable, with an annotation for each; InputError naming the
    key and file otherwise."""
    if not path:
        raise InputError(f"{key}: empty; the validation questions are scored against it")
    annotated = read_annotations(path)
    missing = [q["question_id"] for q in questions if q["question_id"] not in annotated]
    if missing:
        raise InputError(f"{key}={path}: no annotation for {len(missing)} validation question(s), e.g. {missing[:3]}")


def finetune_evaluator(cfg: RunConfig, tokenizer: Any, answers: list[str] | None = None) -> tuple[Evaluator | None, str]:
    """The validation of `cfg.task` on its configured validation data, and the metric that picks the best
    checkpoint; (None, "") when no validation data is configured. The evaluator scores a model and, given a
    folder, writes the predictions there (VQA results json, NLVR2 CSV, COCO caption results)."""
    d, m, bs = cfg.data, cfg.model, cfg.train.batch_size
    tf = eval_transform(m.img_size)
    if cfg.task == "vqa" and d.vqa_val_questions:
        ds = VQADataset(d.vqa_val_questions, d.vqa_images, tokenizer, tf, max_text_len=m.max_text_len)
        check_annotations(d.vqa_val_annotations, ds.questions, "data.vqa_val_annotations")  # now, not after training

        def vqa(model: nn.Module, out: Path | None) -> dict[str, float]:
            results = vqa_predictions(model, ds, answers, bs, _device(model))
            if out is not None:
                (out / "vqa_val_results.json").write_text(json.dumps(results))
            report = evaluate_vqa(results, d.vqa_val_annotations, d.vqa_val_questions)
            return {"vqa_val_accuracy": report["overall"],
                    **{f"vqa_val_{k.replace('/', '_')}": v for k, v in report["per_answer_type"].items()}}

        return vqa, "vqa_val_accuracy"
    if cfg.task == "nlvr2" and d.nlvr2_dev:
        ds = NLVR2Dataset(d.nlvr2_dev, d.nlvr2_images, tokenizer, tf, m.max_text_len)

        def nlvr2(model: nn.Module, out: Path | None) -> dict[str, float]:
            preds = nlvr2_predictions(model, ds, bs, _device(model))
            if out is not None:
                write_predictions(out / "nlvr2_dev_predictions.csv", preds)
            metrics = nlvr2_metrics(ds.rows, preds)
            return {"nlvr2_dev_accuracy": metrics["accuracy"], "nlvr2_dev_consistency": metrics["consistency"]}

        return nlvr2, "nlvr2_dev_accuracy"
    if cfg.task == "caption" and d.caption_val_split:
        split = d.caption_val_split
        ds = CaptionDataset(d.karpathy, d.coco_images, tokenizer, tf, splits=(split,), per_image=True,
                            max_text_len=m.max_text_len)
        beam = BeamConfig(beam_size=d.caption_beam, max_len=m.max_text_len - 2)

        def caption(model: nn.Module, out: Path | None) -> dict[str, float]:
            with tempfile.TemporaryDirectory() as tmp:
                folder = out or Path(tmp)
                gt = write_coco_gt(d.karpathy, split, folder / f"caption_{split}_gt.json")
                scores = evaluate_captions(model, ds, tokenizer, gt, folder / f"caption_{split}_results.json", beam,
                                           bs, _device(model), use_meteor=d.caption_val_meteor)
            return {f"caption_{split}_{k}": v for k, v in scores.items()}

        return caption, f"caption_{split}_CIDEr"
    return None, ""


def build_finetune(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The model (fresh head), loader and loss of the fine-tuning task `cfg.task`."""
    d, m, t = cfg.data, cfg.model, cfg.train
    train_tf = train_transform(m.img_size, d.train_crop_scale, d.train_dihedral)
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
                    lambda model, b, stats=False: model(b["images"], b["text_ids"], b["text_padding"], b["targets"],
                                                        stats=stats), tokens, vocab,
                    source, *finetune_evaluator(cfg, tokenizer, vocab.answers))
    if cfg.task == "nlvr2":
        ds = NLVR2Dataset(d.nlvr2_train, d.nlvr2_images, tokenizer, train_tf, m.max_text_len)
        source = f"data.nlvr2_train={d.nlvr2_train}"
        return Task(BEiT3ForNLVR2(m), loader(ds, source),
                    lambda model, b, stats=False: model(b["images_left"], b["images_right"], b["text_ids"],
                                                        b["text_padding"], b["labels"], stats=stats),
                    tokens, None, source, *finetune_evaluator(cfg, tokenizer))
    if cfg.task == "caption":
        ds = CaptionDataset(d.karpathy, d.coco_images, tokenizer, train_tf, max_text_len=m.max_text_len)
        never = set(tokenizer.all_special_ids) - {tokenizer.sep_token_id}  # [SEP] ends a caption: it is predicted too

        def loss_fn(model: nn.Module, b: dict, stats: bool = False) -> TaskOutput:
            inputs, labels = mask_caption(b["text_ids"], b["text_padding"], d.caption_mask_prob,
                                          tokenizer.mask_token_id, never, b["mask_seeds"])
            return model(b["images"], inputs, b["text_padding"], labels, stats=stats)

        source = f"data.karpathy={d.karpathy}"
        return Task(BEiT3ForCaptioning(m), loader(ds, source), loss_fn, tokens, None, source,
                    *finetune_evaluator(cfg, tokenizer))
    raise ValueError(f"build_finetune: task {cfg.task!r} is not a fine-tuning task (vqa, nlvr2, caption)")


def build_task(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The Task of `cfg.task`, after checking that the tokenizer's ids fit the model's text embedding."""
    check_tokenizer(tokenizer, cfg.model.vocab_size, f"model.tokenizer={cfg.model.tokenizer}")
    build = build_pretrain if cfg.task == "pretrain" else build_finetune
    task = build(cfg, tokenizer, rank, world)
    task.tokenizer = tokenizer
    return task


__all__ = ["encoder_tokens", "pretrain_loss", "finetune_evaluator", "build_pretrain", "build_finetune", "build_task"]
