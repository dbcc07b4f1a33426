"""COCO captioning with the Karpathy splits (dataset_coco.json), and the COCO-format ground truth for scoring."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mm_moe.data.common import SeededItems, Skipped, collate_kept, pad, read_json, require, skipping, text_of
from mm_moe.data.skips import SkipCounter
from mm_moe.data.transforms import seed_of
from mm_moe.errors import InputError

TRAIN_SPLITS = ("train", "restval")


def read_karpathy(path: str | Path, splits: tuple[str, ...]) -> list[dict]:
    """The images of `splits`, checked for the fields we use."""
    images = read_json(path, ("images",))["images"]
    out = []
    for i, im in enumerate(images):
        require(im, ("filename", "cocoid", "split", "sentences"), f"{path}: images[{i}]")
        if im["split"] in splits:
            for j, s in enumerate(im["sentences"]):
                require(s, ("raw",), f"{path}: images[{i}].sentences[{j}]")
            out.append(im)
    if not out:
        raise InputError(f"{path}: no image in split(s) {splits}")
    return out


def write_coco_gt(karpathy: str | Path, split: str, out: str | Path) -> Path:
    """The COCO captions-format ground truth of a Karpathy split (what pycocotools' COCO() loads)."""
    images = read_karpathy(karpathy, (split,))
    anns = []
    for im in images:
        for s in im["sentences"]:
            anns.append({"image_id": im["cocoid"], "id": len(anns), "caption": s["raw"]})
    gt = {"info": {"description": f"Karpathy {split} split"}, "licenses": [], "type": "captions",
          "images": [{"id": im["cocoid"], "file_name": im["filename"]} for im in images], "annotations": anns}
    out = Path(out)
    out.write_text(json.dumps(gt))
    return out


class CaptionDataset(SeededItems, Dataset):
    """Training: one item per (image, caption). Evaluation (`per_image=True`): one item per image."""

    def __init__(self, karpathy: str | Path, images: str | Path, tokenizer: Any, transform: Callable,
                 splits: tuple[str, ...] = TRAIN_SPLITS, per_image: bool = False, max_text_len: int = 64) -> None:
        self.images = read_karpathy(karpathy, splits)
        self.root = Path(images)
        for im in self.images:
            path = self.root / im.get("filepath", "") / im["filename"]
            if not path.is_file():
                raise InputError(f"{path}: image of cocoid {im['cocoid']} in {karpathy} not found")
        self.items = [(i, None) for i in range(len(self.images))] if per_image else \
            [(i, s) for i, im in enumerate(self.images) for s in im["sentences"]]
        self.tokenizer, self.transform, self.max_text_len = tokenizer, transform, max_text_len
        self.source = str(karpathy)
        self.skips = SkipCounter(self.source)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict | Skipped:
        """The item, or Skipped (counted and logged) when its image or caption cannot be read."""
        return skipping(self.skips, lambda: self.item(i))

    def item(self, i: int) -> dict:
        idx, sentence = self.items[i]
        im = self.images[idx]
        path = self.root / im.get("filepath", "") / im["filename"]
        item = {"image_id": im["cocoid"], "image": self.load(path, i)}
        if sentence is not None:
            caption = text_of(sentence, "raw", f"{self.source}: cocoid {im['cocoid']}")
            item["text_ids"] = self.tokenizer(caption, truncation=True, max_length=self.max_text_len)["input_ids"]
            item["mask_seed"] = seed_of(self.seed, self.epoch, i, "mask")
        return item

    def collate(self, items: list[dict | Skipped]) -> dict:
        return collate_kept(items, self._collate)

    def _collate(self, items: list[dict]) -> dict:
        batch = {"image_ids": [it["image_id"] for it in items], "images": torch.stack([it["image"] for it in items])}
        if "text_ids" in items[0]:
            ids = pad([it["text_ids"] for it in items], self.tokenizer.pad_token_id)
            batch.update(text_ids=ids, text_padding=ids == self.tokenizer.pad_token_id,
                         mask_seeds=[it["mask_seed"] for it in items])
        return batch
