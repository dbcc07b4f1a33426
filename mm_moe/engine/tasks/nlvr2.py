"""NLVR2 fine-tuning: one pass per image of the pair, the pooled features joined for a 2-way classifier;
validation by the official accuracy and consistency on the dev file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mm_moe.config import RunConfig
from mm_moe.data.nlvr2 import NLVR2Dataset
from mm_moe.data.transforms import eval_transform, train_transform
from mm_moe.engine.tasks.common import encoder_tokens, finetune_loader, model_device
from mm_moe.engine.trainer import Evaluation, Task
from mm_moe.eval import nlvr2_metrics, nlvr2_predictions, write_predictions
from mm_moe.model import BEiT3ForNLVR2


def evaluation(cfg: RunConfig, tokenizer: Any) -> Evaluation | None:
    """Accuracy and consistency on data.nlvr2_dev (read now), or None."""
    d, m = cfg.data, cfg.model
    if not d.nlvr2_dev:
        return None
    ds = NLVR2Dataset(d.nlvr2_dev, d.nlvr2_images, tokenizer, eval_transform(m.img_size), m.max_text_len)

    def predict(model: nn.Module) -> dict[str, bool]:
        return nlvr2_predictions(model, ds, cfg.train.batch_size, model_device(model))

    def score(preds: dict[str, bool], out: Path | None) -> dict[str, float]:
        if out is not None:
            write_predictions(out / "nlvr2_dev_predictions.csv", preds)
        metrics = nlvr2_metrics(ds.rows, preds)
        return {"nlvr2_dev_accuracy": metrics["accuracy"], "nlvr2_dev_consistency": metrics["consistency"]}

    return Evaluation(predict, score, "nlvr2_dev_accuracy")


def build(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The NLVR2 model (fresh head), loader, loss and validation."""
    d, m = cfg.data, cfg.model
    ds = NLVR2Dataset(d.nlvr2_train, d.nlvr2_images, tokenizer, train_transform(m.img_size, d.train_crop_scale,
                      d.train_dihedral), m.max_text_len)
    source = f"data.nlvr2_train={d.nlvr2_train}"

    def loss_fn(model: nn.Module, b: dict, stats: bool = False):
        return model(b["images_left"], b["images_right"], b["text_ids"], b["text_padding"], b["labels"], stats=stats)

    return Task(model=BEiT3ForNLVR2(m), loader=finetune_loader(cfg, ds, source, rank, world), loss_fn=loss_fn,
                tokens=encoder_tokens(m.patch_size), source=source, evaluation=evaluation(cfg, tokenizer))


__all__ = ["build", "evaluation"]
