"""A deterministic synthetic world of coloured shapes, written in the official file formats.

Each image holds 1-3 objects (distinct shapes, distinct colours) in distinct cells of a 2x2 grid. From it:
captions, VQA questions of five types (colour, shape, count, yes/no, position), NLVR2 statements over image
pairs, and image-caption webdataset shards. Files: VQA v2 questions/annotations json, NLVR2 JSON Lines with
split-set-pair-img0/1.png images, Karpathy dataset_coco.json, shards/*.tar — so the real loaders read it.
Answers are balanced (yes/no exactly, NLVR2 True/False exactly); majority and chance baselines are reported.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 215), "yellow": (225, 195, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    position: str


def sample_scene(rng: random.Random) -> tuple[Obj, ...]:
    """1-3 objects (count uniform), distinct shapes, colours and cells, sorted by cell."""
    n = rng.randint(1, 3)
    shapes, colors, cells = rng.sample(SHAPES, n), rng.sample(list(COLORS), n), rng.sample(POSITIONS, n)
    objs = (Obj(s, c, p) for s, c, p in zip(shapes, colors, cells, strict=True))
    return tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position)))


def render(scene: tuple[Obj, ...], rng: random.Random, size: int = 64) -> Image.Image:
    """The scene on a light background with mild noise; objects jitter inside their cells."""
    bg = rng.randint(225, 245)
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for o in scene:
        row, col = divmod(POSITIONS.index(o.position), 2)
        r = rng.randint(int(cell * 0.28), int(cell * 0.38))
        cx = col * cell + cell // 2 + rng.randint(-cell // 10, cell // 10)
        cy = row * cell + cell // 2 + rng.randint(-cell // 10, cell // 10)
        fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[o.color])
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    noise = Image.effect_noise((size, size), 8).convert("RGB")
    return Image.blend(img, noise, 0.06)


def caption(scene: tuple[Obj, ...], rng: random.Random) -> str:
    """E.g. 'a red circle at the top left and a blue square at the bottom right.'"""
    parts = [f"a {o.color} {o.shape} at the {o.position}" for o in scene]
    if rng.random() < 0.5:
        return " and ".join(parts) + "."
    return f"{NUMBER_WORDS[len(scene)]} shape{'s' if len(scene) > 1 else ''}: " + ", ".join(parts) + "."


def questions(scene: tuple[Obj, ...], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """Five questions (question, answer, question_type, answer_type), one of each type."""
    o = rng.choice(scene)
    present = rng.random() < 0.5
    if present:
        q_shape, q_color = o.shape, o.color
    else:
        present_pairs = {(x.shape, x.color) for x in scene}
        q_shape, q_color = rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in present_pairs])
    return [
        (f"what color is the {o.shape}?", o.color, "what color is the", "other"),
        (f"what shape is the {o.color} object?", o.shape, "what shape is the", "other"),
        ("how many shapes are there?", str(len(scene)), "how many", "number"),
        (f"is there a {q_color} {q_shape}?", "yes" if present else "no", "is there a", "yes/no"),
        (f"where is the {o.color} {o.shape}?", o.position, "where is the", "other"),
    ]


def statement(left: tuple[Obj, ...], right: tuple[Obj, ...], rng: random.Random, label: bool) -> str | None:
    """An NLVR2-style statement about the pair whose truth is `label`, or None if none was found in 50 tries."""
    for _ in range(50):
        kind = rng.randrange(4)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if kind == 0:
            text, truth = "the left image contains more shapes than the right image.", len(left) > len(right)
        elif kind == 1:
            text = f"both images contain a {color} shape."
            truth = any(o.color == color for o in left) and any(o.color == color for o in right)
        elif kind == 2:
            text, truth = f"there is a {shape} in the right image.", any(o.shape == shape for o in right)
        else:
            text = f"the left image has a {color} {shape}."
            truth = any(o.color == color and o.shape == shape for o in left)
        if truth == label:
            return text
    return None


def _vqa_files(out: Path, split: str, records: list[dict]) -> dict:
    """Write the VQA v2 questions and annotations json of one split; returns answer counts."""
    sub = f"{split}2014"
    questions_json = {"info": {"description": "mm-moe synthetic world"}, "task_type": "Open-Ended",
                      "data_type": "mscoco", "data_subtype": sub, "license": {},
                      "questions": [{"image_id": r["image_id"], "question": r["question"],
                                     "question_id": r["question_id"]} for r in records]}
    annotations_json = {"info": {"description": "mm-moe synthetic world"}, "data_subtype": sub, "license": {},
                        "annotations": [{"question_id": r["question_id"], "image_id": r["image_id"],
                                         "question_type": r["question_type"], "answer_type": r["answer_type"],
                                         "multiple_choice_answer": r["answer"],
                                         "answers": [{"answer": r["answer"], "answer_confidence": "yes", "answer_id": i}
                                                     for i in range(1, 11)]} for r in records]}
    (out / f"v2_OpenEnded_mscoco_{sub}_questions.json").write_text(json.dumps(questions_json))
    (out / f"v2_mscoco_{sub}_annotations.json").write_text(json.dumps(annotations_json))
    return Counter(r["answer"] for r in records)


def world_files(world: str | Path) -> dict[str, Path]:
    """The files of a written world under the run-config keys that take them (train_mm.py `key=value` overrides)."""
    w = Path(world)
    return {
        "pretrain_data.shards": w / "shards",
        "data.vqa_train_questions": w / "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
        "data.vqa_train_annotations": w / "vqa/v2_mscoco_train2014_annotations.json",
        "data.vqa_val_questions": w / "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
        "data.vqa_val_annotations": w / "vqa/v2_mscoco_val2014_annotations.json",
        "data.vqa_images": w / "vqa/images",
        "data.nlvr2_train": w / "nlvr2/train.json", "data.nlvr2_dev": w / "nlvr2/dev.json",
        "data.nlvr2_images": w / "nlvr2/images",
        "data.karpathy": w / "coco/dataset_coco.json", "data.coco_images": w / "vqa/images",
    }


def write_world(out: str | Path, n_train: int = 2000, n_val: int = 300, n_test: int = 300, n_pairs_train: int = 2000,
                n_pairs_dev: int = 300, seed: int = 0, size: int = 64, shard_count: int = 500) -> dict:
    """Write the whole synthetic world under `out`; returns a summary with the baselines."""
    import webdataset as wds  # only the writer needs it

    out = Path(out)
    rng = random.Random(seed)
    summary: dict = {"seed": seed, "image_size": size}
    karpathy_images = []
    qid = 0
    for split, n, image_offset in (("train", n_train, 0), ("val", n_val, 1_000_000), ("test", n_test, 2_000_000)):
        img_dir = out / "vqa" / "images" / f"{split}2014"
        img_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            image_id = image_offset + i
            scene = sample_scene(rng)
            name = f"COCO_{split}2014_{image_id:012d}.png"
            render(scene, rng, size).save(img_dir / name)
            caps = [caption(scene, rng) for _ in range(3)]
            karpathy_images.append({"filepath": f"{split}2014", "filename": name, "cocoid": image_id, "imgid": image_id,
                                    "split": split, "sentences": [{"raw": c, "tokens": c.rstrip(".").replace(",", "")
                                                                   .replace(":", "").split()} for c in caps]})
            for question, answer, qtype, atype in questions(scene, rng):
                records.append({"question_id": qid, "image_id": image_id, "question": question, "answer": answer,
                                "question_type": qtype, "answer_type": atype})
                qid += 1
        counts = _vqa_files(out / "vqa", split, records)
        majority, n_major = counts.most_common(1)[0]
        summary[f"vqa_{split}"] = {"questions": len(records), "majority_answer": majority,
                                   "majority_accuracy": round(100 * n_major / len(records), 2)}
    (out / "coco").mkdir(parents=True, exist_ok=True)
    (out / "coco" / "dataset_coco.json").write_text(json.dumps({"images": karpathy_images, "dataset": "coco"}))

    for split, n in (("train", n_pairs_train), ("dev", n_pairs_dev)):
        img_dir = out / "nlvr2" / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        labels = [True] * (n // 2) + [False] * (n - n // 2)
        rng.shuffle(labels)
        for pair_id, label in enumerate(labels):
            text = None
            while text is None:  # resample the pair until a statement with this truth value exists
                left, right = sample_scene(rng), sample_scene(rng)
                text = statement(left, right, rng, label)
            prefix = f"{split}-{pair_id // 10}-{pair_id % 10}"
            render(left, rng, size).save(img_dir / f"{prefix}-img0.png")
            render(right, rng, size).save(img_dir / f"{prefix}-img1.png")
            rows.append({"identifier": f"{prefix}-0", "sentence": text, "label": str(label),
                         "left_url": f"{prefix}-img0.png", "right_url": f"{prefix}-img1.png", "synset": "shapes"})
        (out / "nlvr2" / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary[f"nlvr2_{split}"] = {"statements": n, "true_fraction": round(sum(labels) / n, 4)}

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_pairs = 0
    with wds.ShardWriter(str(shard_dir / "train-%06d.tar"), maxcount=shard_count, verbose=0) as sink:
        for im in karpathy_images:
            if im["split"] != "train":
                continue
            data = (out / "vqa" / "images" / im["filepath"] / im["filename"]).read_bytes()
            for j, s in enumerate(im["sentences"]):
                sink.write({"__key__": f"{im['cocoid']:012d}_{j}", "png": data, "txt": s["raw"],
                            "json": json.dumps({"image_id": im["cocoid"]}).encode()})
                n_pairs += 1
    summary["shards"] = {"pairs": n_pairs, "files": len(list(shard_dir.glob("*.tar")))}
    summary["baselines"] = {"vqa_val_majority": summary["vqa_val"]["majority_accuracy"], "nlvr2_chance": 50.0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
