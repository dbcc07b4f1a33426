"""Evaluation loops per task: a model and an (official-format) dataset in, predictions in the official
submission formats out. Used after fine-tuning (train_mm.py), by eval_vqa.py and by the demo.

The loops take datasets and answer lists as arguments (nothing from `mm_moe.data` is imported here), so the
data layer can use the official metrics of this package without an import circle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mm_moe.errors import InputError
from mm_moe.eval.captioning import score_captions
from mm_moe.model import BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForVQA
from mm_moe.model.generation import BeamConfig, CaptionDecoder


def _batches(ds: Any, batch_size: int, desc: str) -> Iterator[dict]:
    """The evaluation batches of `ds`; an item that could not be read (logged with its cause) is an error here:
    every item of an evaluation split must be scored."""
    for batch in tqdm(DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate), desc=desc, unit="batch", leave=False):
        if batch.get("num_skipped"):
            raise InputError(f"{getattr(ds, 'source', desc)}: {batch['num_skipped']} evaluation item(s) could not be "
                             "read (see the skipped-sample warning above); every item must be scored")
        yield batch


@torch.no_grad()
def vqa_predictions(model: BEiT3ForVQA, ds: Dataset, answers: list[str], batch_size: int,
                    device: torch.device) -> list[dict]:
    """[{"question_id", "answer"}] for every question of a VQADataset (argmax over the answer vocabulary)."""
    model.eval()
    results = []
    for b in _batches(ds, batch_size, "vqa eval"):
        logits = model(b["images"].to(device), b["text_ids"].to(device), b["text_padding"].to(device)).logits
        results += [{"question_id": q, "answer": answers[i]}
                    for q, i in zip(b["question_ids"], logits.argmax(1).tolist(), strict=True)]
    return results


@torch.no_grad()
def nlvr2_predictions(model: BEiT3ForNLVR2, ds: Dataset, batch_size: int, device: torch.device) -> dict[str, bool]:
    """identifier -> predicted truth for every statement of an NLVR2Dataset."""
    model.eval()
    out: dict[str, bool] = {}
    for b in _batches(ds, batch_size, "nlvr2 eval"):
        logits = model(b["images_left"].to(device), b["images_right"].to(device), b["text_ids"].to(device),
                       b["text_padding"].to(device)).logits
        out.update(zip(b["identifiers"], (logits.argmax(1) == 1).tolist(), strict=True))
    return out


@torch.no_grad()
def caption_predictions(model: BEiT3ForCaptioning, ds: Dataset, tokenizer: Any, beam: BeamConfig, batch_size: int,
                        device: torch.device) -> list[dict]:
    """COCO caption results [{"image_id", "caption"}] of a per-image CaptionDataset, by beam search."""
    decoder = CaptionDecoder(model.to(device), tokenizer, beam)
    results = []
    for b in _batches(ds, batch_size, "caption eval"):
        results += [{"image_id": i, "caption": c}
                    for i, c in zip(b["image_ids"], decoder.captions(b["images"].to(device)), strict=True)]
    return results


def evaluate_captions(model: BEiT3ForCaptioning, ds: Dataset, tokenizer: Any, gt_json: str | Path, results_json: str | Path,
                      beam: BeamConfig | None = None, batch_size: int = 32, device: torch.device | None = None,
                      use_spice: bool = False, use_meteor: bool = True) -> dict[str, float]:
    """Caption every image of `ds`, write the results file, and score it against a COCO-format ground truth."""
    results = caption_predictions(model, ds, tokenizer, beam or BeamConfig(), batch_size, device or torch.device("cpu"))
    Path(results_json).write_text(json.dumps(results))
    return score_captions(gt_json, results, use_spice=use_spice, use_meteor=use_meteor)


__all__ = ["vqa_predictions", "nlvr2_predictions", "caption_predictions", "evaluate_captions"]
