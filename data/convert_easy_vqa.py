"""Convert the real easy-VQA dataset shipped in the PyPI package `easy-vqa` into VQA v2 format files.

    python data/convert_easy_vqa.py --out data/easy_vqa
writes out/v2_OpenEnded_mscoco_{train,val}2014_questions.json, out/v2_mscoco_{train,val}2014_annotations.json and
out/images/{train,val}2014/COCO_{split}2014_{id:012d}.png (easy-VQA's test split becomes val). Each question's ten
human answers are its single answer repeated, so the official metric scores exact matches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path


def answer_type(question: str, answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "other"


def question_type(question: str) -> str:
    """The question's first words, as VQA v2's question_type field (e.g. 'what color is the', 'is there a')."""
    words = question.rstrip("?").split()
    return " ".join(words[:4] if words[0] == "what" else words[:3])


def convert(out: Path) -> dict:
    try:
        import easy_vqa
    except ModuleNotFoundError as err:
        raise SystemExit("the easy-VQA data ships in the PyPI package easy-vqa: pip install easy-vqa") from err
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    qid = 0
    for src, split, offset, questions, images in (
        ("train", "train", 0, easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", "val", 100_000, easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        sub = f"{split}2014"
        img_dir = out / "images" / sub
        img_dir.mkdir(parents=True, exist_ok=True)
        for image_id, path in images.items():
            shutil.copyfile(path, img_dir / f"COCO_{sub}_{offset + image_id:012d}.png")
        qs, anns = [], []
        for text, answer, image_id in zip(*questions, strict=True):
            qs.append({"image_id": offset + image_id, "question": text, "question_id": qid})
            anns.append({"question_id": qid, "image_id": offset + image_id, "question_type": question_type(text),
                         "answer_type": answer_type(text, answer), "multiple_choice_answer": answer,
                         "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]})
            qid += 1
        (out / f"v2_OpenEnded_mscoco_{sub}_questions.json").write_text(json.dumps(
            {"info": {"description": f"easy-VQA {src} split"}, "task_type": "Open-Ended", "data_type": "mscoco",
             "data_subtype": sub, "license": {}, "questions": qs}))
        (out / f"v2_mscoco_{sub}_annotations.json").write_text(json.dumps(
            {"info": {"description": f"easy-VQA {src} split"}, "data_subtype": sub, "license": {}, "annotations": anns}))
        majority, n = Counter(a["multiple_choice_answer"] for a in anns).most_common(1)[0]
        summary[split] = {"images": len(images), "questions": len(qs), "majority_answer": majority,
                          "majority_accuracy": round(100 * n / len(qs), 2)}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    print(json.dumps(convert(p.parse_args(argv).out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
