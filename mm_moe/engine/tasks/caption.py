"""COCO captioning fine-tuning (Karpathy splits): masked-token prediction under the captioning mask; validation by
beam search and the COCO caption scorers on data.caption_val_split."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from mm_moe.config import RunConfig
from mm_moe.data.coco import CaptionDataset, write_coco_gt
from mm_moe.data.masking import mask_caption
from mm_moe.data.transforms import eval_transform, train_transform
from mm_moe.engine.tasks.common import encoder_tokens, finetune_loader, model_device
from mm_moe.engine.trainer import Evaluation, Task
from mm_moe.eval import caption_predictions, score_captions
from mm_moe.model import BeamConfig, BEiT3ForCaptioning, TaskOutput


def evaluation(cfg: RunConfig, tokenizer: Any) -> Evaluation | None:
    """COCO scores (CIDEr picks the best checkpoint) on data.caption_val_split (read now), or None."""
    d, m = cfg.data, cfg.model
    split = d.caption_val_split
    if not split:
        return None
    ds = CaptionDataset(d.karpathy, d.coco_images, tokenizer, eval_transform(m.img_size), splits=(split,), per_image=True,
                        max_text_len=m.max_text_len)
    beam = BeamConfig(beam_size=d.caption_beam, max_len=m.max_text_len - 2)

    def predict(model: nn.Module) -> list[dict]:
        return caption_predictions(model, ds, tokenizer, beam, cfg.train.batch_size, model_device(model))

    def score(results: list[dict], out: Path | None) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = out or Path(tmp)
            gt = write_coco_gt(d.karpathy, split, folder / f"caption_{split}_gt.json")
            (folder / f"caption_{split}_results.json").write_text(json.dumps(results))
            scores = score_captions(gt, results, use_meteor=d.caption_val_meteor)
        return {f"caption_{split}_{k}": v for k, v in scores.items()}

    return Evaluation(predict, score, f"caption_{split}_CIDEr")


def build(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The captioning model (fresh head), loader, masked-caption loss and validation."""
    d, m = cfg.data, cfg.model
    ds = CaptionDataset(d.karpathy, d.coco_images, tokenizer, train_transform(m.img_size, d.train_crop_scale,
                        d.train_dihedral), max_text_len=m.max_text_len)
    never = set(tokenizer.all_special_ids) - {tokenizer.sep_token_id}  # [SEP] ends a caption: it is predicted too
    source = f"data.karpathy={d.karpathy}"

    def loss_fn(model: nn.Module, b: dict, stats: bool = False) -> TaskOutput:
        inputs, labels = mask_caption(b["text_ids"], b["text_padding"], d.caption_mask_prob, tokenizer.mask_token_id,
                                      never, b["mask_seeds"])
        return model(b["images"], inputs, b["text_padding"], labels, stats=stats)

    return Task(model=BEiT3ForCaptioning(m), loader=finetune_loader(cfg, ds, source, rank, world), loss_fn=loss_fn,
                tokens=encoder_tokens(m.patch_size), source=source, evaluation=evaluation(cfg, tokenizer))


__all__ = ["build", "evaluation"]
