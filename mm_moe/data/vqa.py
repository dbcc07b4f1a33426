"""VQA v2 from the official files: questions json, annotations json, COCO image folder.

Answer vocabulary: normalised `multiple_choice_answer`s seen at least `min_count` times (9 gives VQA v2's 3,129).
Targets: soft scores min(1, 0.3 * n) where n counts the 10 human answers (normalised) equal to a vocabulary answer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mm_moe.data.common import (
    SeededItems,
    Skipped,
    collate_kept,
    images_by_number,
    pad,
    read_json,
    require,
    skipping,
    text_of,
)
from mm_moe.data.skips import SkipCounter
from mm_moe.errors import InputError
from mm_moe.formats.vqa import normalize_answer, read_annotations, read_questions

PathOrPaths = str | Path | Sequence[str | Path]


def as_paths(files: PathOrPaths) -> list[Path]:
    """One file or several (VQA train + val) as a list of paths."""
    return [Path(files)] if isinstance(files, str | Path) else [Path(f) for f in files]


class AnswerVocab:
    """The answers a VQA classifier predicts over."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def build(cls, annotation_files: PathOrPaths, min_count: int = 9) -> AnswerVocab:
        """Normalised multiple_choice_answers of all files seen at least `min_count` times."""
        counts: Counter[str] = Counter()
        for path in as_paths(annotation_files):
            for i, ann in enumerate(read_json(path, ("annotations",))["annotations"]):
                require(ann, ("multiple_choice_answer",), f"{path}: annotations[{i}]")
                counts[normalize_answer(ann["multiple_choice_answer"])] += 1
        # most frequent first, ties alphabetical: a deterministic order
        return cls([a for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.answers, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> AnswerVocab:
        return cls(read_json(path))

    def soft_scores(self, answers: list[str]) -> torch.Tensor:
        """f32[len(vocab)]: min(1, 0.3 * n) for every vocabulary answer given n times among `answers`."""
        target = torch.zeros(len(self.answers))
        for answer, n in Counter(normalize_answer(a) for a in answers).items():
            if answer in self.index:
                target[self.index[answer]] = min(1.0, 0.3 * n)
        return target


class VQADataset(SeededItems, Dataset):
    """One item per question: image, tokenised question, and (with annotations) soft answer scores."""

    def __init__(self, questions: PathOrPaths, images: str | Path, tokenizer: Any, transform: Callable,
                 annotations: PathOrPaths | None = None, vocab: AnswerVocab | None = None, max_text_len: int = 64) -> None:
        self.questions, seen = [], set()
        for path in as_paths(questions):
            for i, q in enumerate(read_questions(path)):
                require(q, ("question_id", "image_id", "question"), f"{path}: questions[{i}]")
                if q["question_id"] in seen:
                    raise InputError(f"{path}: questions[{i}]: question_id {q['question_id']} is in an earlier file too")
                seen.add(q["question_id"])
                self.questions.append(q)
        self.image_paths = images_by_number(images)
        missing = sorted({q["image_id"] for q in self.questions} - set(self.image_paths))
        if missing:
            raise InputError(f"{images}: no image for {len(missing)} image_id(s) of {questions}, e.g. {missing[:3]}")
        self.answers: dict[int, list[str]] = {}
        if annotations is not None:
            for path in as_paths(annotations):
                for qid, ann in read_annotations(path, fields=()).items():
                    self.answers[qid] = [a["answer"] for a in ann["answers"]]
            unanswered = [q["question_id"] for q in self.questions if q["question_id"] not in self.answers]
            if unanswered:
                raise InputError(f"{annotations}: no annotation for question_id(s) {unanswered[:3]} of {questions}")
        self.tokenizer, self.transform, self.vocab, self.max_text_len = tokenizer, transform, vocab, max_text_len
        self.source = f"{questions}"
        self.skips = SkipCounter(self.source)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict | Skipped:
        """The item, or Skipped (counted and logged) when its image or question cannot be read."""
        return skipping(self.skips, lambda: self.item(i))

    def item(self, i: int) -> dict:
        q = self.questions[i]
        text = text_of(q, "question", f"{self.source}: question_id {q['question_id']}")
        item = {
            "question_id": q["question_id"],
            "image": self.load(self.image_paths[q["image_id"]], i),
            "text_ids": self.tokenizer(text, truncation=True, max_length=self.max_text_len)["input_ids"],
        }
        if self.vocab is not None and self.answers:
            item["targets"] = self.vocab.soft_scores(self.answers[q["question_id"]])
        return item

    def collate(self, items: list[dict | Skipped]) -> dict:
        return collate_kept(items, self._collate)

    def _collate(self, items: list[dict]) -> dict:
        ids = pad([it["text_ids"] for it in items], self.tokenizer.pad_token_id)
        batch = {"question_ids": [it["question_id"] for it in items], "images": torch.stack([it["image"] for it in items]),
                 "text_ids": ids, "text_padding": ids == self.tokenizer.pad_token_id}
        if "targets" in items[0]:
            batch["targets"] = torch.stack([it["targets"] for it in items])
        return batch
