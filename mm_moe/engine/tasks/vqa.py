"""VQA v2 fine-tuning: multi-label answer classification over the answer vocabulary of the training annotations;
validation by the official accuracy on the validation questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mm_moe.config import RunConfig
from mm_moe.data.transforms import eval_transform, train_transform
from mm_moe.data.vqa import AnswerVocab, VQADataset
from mm_moe.engine.tasks.common import encoder_tokens, finetune_loader, model_device
from mm_moe.engine.trainer import Evaluation, Task
from mm_moe.errors import InputError
from mm_moe.eval import evaluate_vqa, vqa_predictions
from mm_moe.formats.vqa import read_annotations
from mm_moe.model import BEiT3ForVQA


def check_annotations(path: str, questions: list[dict], key: str) -> None:
    """The VQA annotations file that scores `questions`: readable, with an annotation for each; InputError naming the
    key and file otherwise."""
    if not path:
        raise InputError(f"{key}: empty; the validation questions are scored against it")
    annotated = read_annotations(path)
    missing = [q["question_id"] for q in questions if q["question_id"] not in annotated]
    if missing:
        raise InputError(f"{key}={path}: no annotation for {len(missing)} validation question(s), e.g. {missing[:3]}")


def evaluation(cfg: RunConfig, tokenizer: Any, answers: list[str]) -> Evaluation | None:
    """Official accuracy on data.vqa_val_questions (read and checked now, not after training), or None."""
    d, m = cfg.data, cfg.model
    if not d.vqa_val_questions:
        return None
    ds = VQADataset(d.vqa_val_questions, d.vqa_images, tokenizer, eval_transform(m.img_size), max_text_len=m.max_text_len)
    check_annotations(d.vqa_val_annotations, ds.questions, "data.vqa_val_annotations")

    def predict(model: nn.Module) -> list[dict]:
        return vqa_predictions(model, ds, answers, cfg.train.batch_size, model_device(model))

    def score(results: list[dict], out: Path | None) -> dict[str, float]:
        if out is not None:
            (out / "vqa_val_results.json").write_text(json.dumps(results))
        report = evaluate_vqa(results, d.vqa_val_annotations, d.vqa_val_questions)
        return {"vqa_val_accuracy": report["overall"],
                **{f"vqa_val_{k.replace('/', '_')}": v for k, v in report["per_answer_type"].items()}}

    return Evaluation(predict, score, "vqa_val_accuracy")


def build(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The VQA model (a fresh head over the vocabulary), loader, loss and validation."""
    d, m = cfg.data, cfg.model
    vocab = AnswerVocab.build(d.vqa_train_annotations, d.answer_min_count)
    if not len(vocab):
        raise InputError(f"data.vqa_train_annotations={d.vqa_train_annotations}: no answer occurs "
                         f"{d.answer_min_count}+ times")
    ds = VQADataset(d.vqa_train_questions, d.vqa_images, tokenizer, train_transform(m.img_size, d.train_crop_scale,
                    d.train_dihedral), d.vqa_train_annotations, vocab, m.max_text_len)
    source = f"data.vqa_train_questions={d.vqa_train_questions}"

    def loss_fn(model: nn.Module, b: dict, stats: bool = False):
        return model(b["images"], b["text_ids"], b["text_padding"], b["targets"], stats=stats)

    return Task(model=BEiT3ForVQA(m, len(vocab)), loader=finetune_loader(cfg, ds, source, rank, world), loss_fn=loss_fn,
                tokens=encoder_tokens(m.patch_size), source=source, evaluation=evaluation(cfg, tokenizer, vocab.answers),
                answers=vocab.answers, files={"answers.json": vocab.save})


__all__ = ["build", "evaluation", "check_annotations"]
