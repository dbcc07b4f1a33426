"""NLVR2 from the official JSON Lines (identifier, sentence, left_url, right_url, label) and its image folders.

Images are named {split}-{set_id}-{pair_id}-img0.png / -img1.png after the identifier {split}-{set_id}-{pair_id}-{n}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mm_moe.data.common import SeededItems, Skipped, collate_kept, images_by_name, pad, require, skipping, text_of
from mm_moe.data.skips import SkipCounter
from mm_moe.errors import InputError


def read_nlvr2(path: str | Path) -> list[dict]:
    """Rows of an NLVR2 .json(l) file, checked for the fields we use."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{n}: not valid JSON ({err})") from err
        require(row, ("identifier", "sentence", "label"), f"{path}:{n}")
        if row["label"] not in ("True", "False"):
            raise InputError(f"{path}:{n}: label must be 'True' or 'False', got {row['label']!r}")
        rows.append(row)
    return rows


def image_names(identifier: str) -> tuple[str, str]:
    """The left/right image file names of a statement identifier."""
    prefix = identifier.rsplit("-", 1)[0]
    return f"{prefix}-img0.png", f"{prefix}-img1.png"


class NLVR2Dataset(SeededItems, Dataset):
    """One item per statement: left and right images, tokenised sentence, label (1 = True)."""

    def __init__(self, jsonl: str | Path, images: str | Path, tokenizer: Any, transform: Callable,
                 max_text_len: int = 64) -> None:
        self.rows = read_nlvr2(jsonl)
        self.paths = images_by_name(images)
        for row in self.rows:
            for name in image_names(row["identifier"]):
                if name not in self.paths:
                    raise InputError(f"{images}: missing {name} for {row['identifier']} of {jsonl}")
        self.tokenizer, self.transform, self.max_text_len = tokenizer, transform, max_text_len
        self.source = str(jsonl)
        self.skips = SkipCounter(self.source)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict | Skipped:
        """The item, or Skipped (counted and logged) when an image or the sentence cannot be read."""
        return skipping(self.skips, lambda: self.item(i))

    def item(self, i: int) -> dict:
        row = self.rows[i]
        text = text_of(row, "sentence", f"{self.source}: {row['identifier']}")
        left, right = (self.load(self.paths[n], i, which) for which, n in enumerate(image_names(row["identifier"])))
        return {"identifier": row["identifier"], "left": left, "right": right, "label": int(row["label"] == "True"),
                "text_ids": self.tokenizer(text, truncation=True, max_length=self.max_text_len)["input_ids"]}

    def collate(self, items: list[dict | Skipped]) -> dict:
        return collate_kept(items, self._collate)

    def _collate(self, items: list[dict]) -> dict:
        ids = pad([it["text_ids"] for it in items], self.tokenizer.pad_token_id)
        return {"identifiers": [it["identifier"] for it in items],
                "images_left": torch.stack([it["left"] for it in items]),
                "images_right": torch.stack([it["right"] for it in items]),
                "text_ids": ids, "text_padding": ids == self.tokenizer.pad_token_id,
                "labels": torch.tensor([it["label"] for it in items])}
