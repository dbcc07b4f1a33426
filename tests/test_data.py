"""Tokenizer, masking, webdataset pipeline (with broken shards), make_shards, task datasets, synthetic world."""

from __future__ import annotations

import codecs
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import this
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from tiny import monomodal_shards

from mm_moe.config import BEiT3Config, PretrainDataConfig
from mm_moe.data.coco import CaptionDataset, write_coco_gt
from mm_moe.data.masking import BlockMasking, mask_text
from mm_moe.data.nlvr2 import NLVR2Dataset
from mm_moe.data.shards import PretrainSample, pretrain_loader
from mm_moe.data.skips import SampleError
from mm_moe.data.stream import INDEX_DIR, IndexedEpoch, RankBatches, ShardIndex, index_shard, read_sample
from mm_moe.data.synthetic import write_world
from mm_moe.data.tokenizer import VOCAB_SIZE, load_tokenizer
from mm_moe.data.transforms import eval_transform
from mm_moe.data.vqa import AnswerVocab, VQADataset
from mm_moe.errors import InputError
from mm_moe.formats.vqa import normalize_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = write_world(out, n_train=24, n_val=8, n_test=8, n_pairs_train=10, n_pairs_dev=6, seed=3, size=32,
                          shard_count=20)
    return out, summary


def test_tokenizer_is_the_real_bert_vocab(tok):
    assert len(tok) == VOCAB_SIZE
    zen = codecs.decode(this.s, "rot13")
    ids = tok(zen)["input_ids"]
    unk = sum(i == tok.unk_token_id for i in ids)
    assert len(ids) > 150 and unk / len(ids) < 0.01
    assert tok.decode(tok("a red circle at the top left.")["input_ids"], skip_special_tokens=True) == \
        "a red circle at the top left."
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id) == (101, 102, 0, 103)


def test_mask_text_rates_and_specials():
    rng = random.Random(0)
    special = {101, 102}
    ids = [101] + [2000 + i % 500 for i in range(20000)] + [102]
    inputs, labels = mask_text(ids, special_ids=special, mask_id=103, vocab_size=30522, rng=rng)
    chosen = [i for i, lab in enumerate(labels) if lab != -100]
    assert labels[0] == labels[-1] == -100 and inputs[0] == 101 and inputs[-1] == 102
    assert all(labels[i] == ids[i] for i in chosen)
    assert abs(len(chosen) / 20000 - 0.15) < 0.01  # ~3000 draws: 0.01 is > 3 standard deviations
    masked = sum(inputs[i] == 103 for i in chosen) / len(chosen)
    kept = sum(inputs[i] == ids[i] for i in chosen) / len(chosen)
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    # a short text still gets one prediction target
    _, labels = mask_text([101, 7, 102], special_ids=special, mask_id=103, vocab_size=30522, rng=random.Random(5), prob=0.0)
    assert labels == [-100, 7, -100]


def test_block_masking():
    gen = BlockMasking((14, 14), 75, min_block=16)
    rng = random.Random(0)
    counts = [int(gen(rng).sum()) for _ in range(200)]
    assert max(counts) <= 75 and sum(counts) / len(counts) > 0.95 * 75
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    m = gen(random.Random(1)).reshape(14, 14)
    neighbours = torch.zeros_like(m)
    neighbours[1:] |= m[:-1]
    neighbours[:-1] |= m[1:]
    neighbours[:, 1:] |= m[:, :-1]
    neighbours[:, :-1] |= m[:, 1:]
    assert (m & neighbours).sum() >= 0.9 * m.sum()
    assert torch.equal(gen(random.Random(7)), gen(random.Random(7)))


def _add_broken_shard(shard_dir: Path) -> None:
    """A shard with 2 good samples, a corrupt image, and a sample without caption."""
    good = Image.new("RGB", (32, 32), (200, 30, 30))
    buf = io.BytesIO()
    good.save(buf, format="PNG")
    members = [("good0.png", buf.getvalue()), ("good0.txt", b"a red square."),
               ("corrupt.png", b"\x89PNG not really"), ("corrupt.txt", b"broken image."),
               ("nocaption.png", buf.getvalue()),
               ("good1.png", buf.getvalue()), ("good1.txt", b"another red square.")]
    with tarfile.open(shard_dir / "broken-000000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _add_truncated_shard(shard_dir: Path, source: Path) -> tuple[int, bool]:
    """A copy of `source` cut in the middle of its last member.

    Returns the complete samples before the cut, and whether the last, partial sample (its members before the
    cut) still has an image and a caption.
    """
    data = source.read_bytes()
    with tarfile.open(source) as tar:
        members = tar.getmembers()
    last = members[-1]
    (shard_dir / "truncated-000000.tar").write_bytes(data[:last.offset_data + last.size // 2])
    key_of = [m.name.split(".", 1)[0] for m in members]
    partial = {m.name.split(".", 1)[1] for m in members[:-1] if key_of[members.index(m)] == key_of[-1]}
    return len(set(key_of)) - 1, "txt" in partial and "png" in partial


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_skips_and_counts_broken_samples(world, tok, tmp_path, workers):
    out, summary = world
    shards = sorted((out / "shards").glob("*.tar"))
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in shards:
        (shard_dir / s.name).write_bytes(s.read_bytes())
    _add_broken_shard(shard_dir)
    good_in_truncated, partial_ok = _add_truncated_shard(shard_dir, shards[0])
    urls = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    model = BEiT3Config(img_size=32, patch_size=8, max_text_len=24)
    loader = pretrain_loader(urls, tok, PretrainDataConfig(shuffle_buffer=10), model, batch_size=8, num_workers=workers)
    n_samples, n_skipped = 0, 0
    for batch in loader:
        n_samples += len(batch["keys"])
        n_skipped += batch["num_skipped"]
        assert batch["images"].shape[1:] == (3, 32, 32) and batch["patch_mask"].shape[1] == 16
        assert (batch["mlm_labels"] != -100).any(dim=1).all()
        assert torch.equal(batch["text_padding"], batch["text_ids"] == tok.pad_token_id)
    # corrupt image + missing caption + the truncated tar (+ its partial last sample if it lacks image or caption)
    assert n_skipped == 3 + (not partial_ok)
    assert n_samples == summary["shards"]["pairs"] + 2 + good_in_truncated + partial_ok


def test_ranks_see_disjoint_shards_and_equal_batches(world, tok):
    out, _ = world
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    assert len(urls) >= 2
    model = BEiT3Config(img_size=32, patch_size=8, max_text_len=24)
    keys, resampled_keys = [], []
    resampled = PretrainDataConfig(shuffle_buffer=4, epoch_batches=5)
    for rank in (0, 1):
        keys.append({k for b in pretrain_loader(urls, tok, PretrainDataConfig(shuffle_buffer=4), model, batch_size=4,
                                                rank=rank, world=2) for k in b["keys"]})
        runs = [[b["keys"] for b in pretrain_loader(urls, tok, resampled, model, batch_size=4, rank=rank, world=2)]
                for _ in range(2)]
        assert len(runs[0]) == 5 and runs[0] == runs[1]  # resampling is deterministic: exact resume
        resampled_keys.append(runs[0])
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == {k for b in pretrain_loader(urls, tok, PretrainDataConfig(shuffle_buffer=4), model,
                                                            batch_size=4) for k in b["keys"]}
    assert resampled_keys[0] != resampled_keys[1]  # each rank draws its own stream


def test_pretraining_batches_do_not_depend_on_where_the_shards_are(world, tok, tmp_path):
    """Crops and masks come from (seed, shard file name, key): a copy of the shards elsewhere gives the same run."""
    out, _ = world
    copy = tmp_path / "elsewhere" / "shards"
    shutil.copytree(out / "shards", copy)
    model = BEiT3Config(img_size=32, patch_size=8, max_text_len=24)
    runs = [list(pretrain_loader([str(p) for p in sorted(d.glob("*.tar"))], tok, PretrainDataConfig(shuffle_buffer=4),
                                 model, batch_size=4, seed=7)) for d in (out / "shards", copy)]
    assert len(runs[0]) == len(runs[1]) > 1
    for a, b in zip(*runs, strict=True):
        for key in ("keys", "masked_ids", "mlm_labels", "patch_mask", "images"):
            assert (a[key] == b[key]).all() if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_make_shards_cli_reports_unreadable_images(tmp_path, tok):
    images = tmp_path / "imgs"
    images.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (20, 20), color).save(images / f"img.{i}.jpg")
    (images / "bad.jpg").write_bytes(b"not an image")
    lines = [{"image": "img.0.jpg", "caption": "red."}, {"image": "img.1.jpg", "caption": "green."},
             {"image": "bad.jpg", "caption": "nothing."}]
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = subprocess.run([sys.executable, str(ROOT / "data" / "make_shards.py"), "--captions", str(captions),
                          "--images", str(images), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote 2 samples in 1 shards" in res.stdout and "skipped 1 of 3 samples" in res.stderr
    assert "bad.jpg" in res.stderr
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        names = tar.getnames()
    assert sorted(names) == sorted(["img_0_0.jpg", "img_0_0.txt", "img_0_0.json", "img_1_0.jpg", "img_1_0.txt", "img_1_0.json"])



def test_make_shards_writes_monomodal_shards_that_pretraining_reads(tmp_path, tok):
    """--images-only: every image under the folder (an unreadable one skipped and named); --texts: one sample per
    non-empty line. Pretraining's preparation reads them as images alone and texts alone."""
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(images / "a.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(images / "sub" / "b.jpg")
    (images / "bad.jpg").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not an image either")
    texts = tmp_path / "corpus.txt"
    texts.write_text("a red square.\n\n  \nthe blue circle is small.\n")
    script = [sys.executable, str(ROOT / "data" / "make_shards.py")]
    res = subprocess.run([*script, "--images-only", "--images", str(images), "--out", str(tmp_path / "i")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote 2 samples" in res.stdout and "skipped 1 of 3 samples" in res.stderr and "bad.jpg" in res.stderr
    res = subprocess.run([*script, "--texts", str(texts), "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with tarfile.open(next((tmp_path / "i").glob("*.tar"))) as tar:
        assert sorted(tar.getnames()) == ["a_0.json", "a_0.png", "b_0.jpg", "b_0.json"]
    with tarfile.open(next((tmp_path / "t").glob("*.tar"))) as tar:
        assert sorted(tar.getnames()) == ["line000000001_0.json", "line000000001_0.txt", "line000000004_0.json",
                                          "line000000004_0.txt"]
    prepare = PretrainSample(tok, PretrainDataConfig(), BEiT3Config(img_size=32, patch_size=8, max_text_len=24), seed=0)
    for folder, part, fields in (("i", "image", {"key", "image", "patch_mask"}),
                                 ("t", "text", {"key", "text_ids", "masked_ids", "mlm_labels"})):
        url = str(next((tmp_path / folder).glob("*.tar")))
        prepared = [prepare(read_sample(url, int(o), int(n)), part) for o, n in index_shard(url)]
        assert len(prepared) == 2 and all(set(x) == fields for x in prepared)
    assert tok.decode(prepared[1]["text_ids"], skip_special_tokens=True) == "the blue circle is small."
    with pytest.raises(SampleError, match="missing or empty text"):
        prepare({"__key__": "k", "__url__": "x.tar", "png": Image.new("RGB", (8, 8))}, "text")

def test_vqa_dataset_reads_official_format(world, tok):
    out, summary = world
    ann = out / "vqa" / "v2_mscoco_train2014_annotations.json"
    vocab = AnswerVocab.build([ann], min_count=1)
    ds = VQADataset(out / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json", out / "vqa" / "images", tok,
                    eval_transform(32), ann, vocab)
    assert len(ds) == summary["vqa_train"]["questions"]
    batch = ds.collate([ds[i] for i in range(5)])
    assert batch["images"].shape == (5, 3, 32, 32) and batch["targets"].shape == (5, len(vocab))
    assert torch.equal(batch["targets"].max(1).values, torch.ones(5))  # 10 identical answers: score 1


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_train_crop_scale_one_trains_on_the_whole_image(world, tok, scale):
    """data.train_crop_scale=1: fine-tuning images are the eval transform's (nothing cut off); below 1, crops."""
    from mm_moe.config import RunConfig
    from mm_moe.config_files import load_config
    from mm_moe.data.synthetic import world_files
    from mm_moe.engine import build_task

    out, _ = world
    files = [f"{k}={v}" for k, v in world_files(out).items() if k.startswith("data.vqa_")]
    cfg = load_config(RunConfig, ROOT / "configs" / "finetune_vqa_demo.yaml",
                      ["task=vqa", *files, "train.batch_size=4", f"data.train_crop_scale={scale}"])
    batch = next(iter(build_task(cfg, tok).loader(0)))
    whole = VQADataset(cfg.data.vqa_train_questions, out / "vqa" / "images", tok, eval_transform(cfg.model.img_size))
    index = {q["question_id"]: i for i, q in enumerate(whole.questions)}
    expected = torch.stack([whole[index[q]]["image"] for q in batch["question_ids"]])
    assert torch.equal(batch["images"], expected) == (scale == 1.0)


def test_train_dihedral_gives_the_squares_eight_symmetries(world, tok):
    """data.train_dihedral: every training image is exactly one of the 8 flips / quarter turns of the whole image
    (no resampling), and over enough draws all 8 occur."""
    from mm_moe.config import RunConfig
    from mm_moe.config_files import load_config
    from mm_moe.data.synthetic import world_files
    from mm_moe.engine import build_task

    out, _ = world
    files = [f"{k}={v}" for k, v in world_files(out).items() if k.startswith("data.vqa_")]
    cfg = load_config(RunConfig, ROOT / "configs" / "finetune_vqa_demo.yaml",
                      ["task=vqa", *files, "train.batch_size=16", "data.train_crop_scale=1", "data.train_dihedral=true"])
    whole = VQADataset(cfg.data.vqa_train_questions, out / "vqa" / "images", tok, eval_transform(cfg.model.img_size))
    index = {q["question_id"]: i for i, q in enumerate(whole.questions)}
    seen = Counter()
    loader = build_task(cfg, tok).loader
    for epoch in range(6):
        batch = next(iter(loader(epoch)))
        for q, image in zip(batch["question_ids"], batch["images"], strict=True):
            plain = whole[index[q]]["image"]
            views = [torch.rot90(plain.flip(2) if f else plain, k, (1, 2)) for f in (0, 1) for k in range(4)]
            matches = [i for i, v in enumerate(views) if torch.equal(image, v)]
            assert len(matches) == 1, "not one of the image's 8 symmetries (or a symmetric image)"
            seen[matches[0]] += 1
    assert len(seen) == 8, seen


def test_vqa_train_plus_val_files(world, tok, tmp_path):
    """BEiT-3 trains VQA on train + val: lists of question and annotation files; the vocabulary counts all."""
    out, summary = world
    qs = [out / "vqa" / f"v2_OpenEnded_mscoco_{s}2014_questions.json" for s in ("train", "val")]
    anns = [out / "vqa" / f"v2_mscoco_{s}2014_annotations.json" for s in ("train", "val")]
    vocab = AnswerVocab.build(anns, min_count=1)
    ds = VQADataset(qs, out / "vqa" / "images", tok, eval_transform(32), anns, vocab)
    assert len(ds) == summary["vqa_train"]["questions"] + summary["vqa_val"]["questions"]
    answers = [json.loads(a.read_text())["annotations"] for a in anns]
    counts = Counter(normalize_answer(x["multiple_choice_answer"]) for part in answers for x in part)
    assert vocab.answers == sorted(counts, key=lambda a: (-counts[a], a))  # most frequent first, ties alphabetical
    with pytest.raises(InputError, match=r"question_id \d+ is in an earlier file too"):
        VQADataset([qs[0], qs[0]], out / "vqa" / "images", tok, eval_transform(32))


def test_answer_vocab_and_soft_scores(tmp_path):
    anns = {"annotations": [{"multiple_choice_answer": a} for a in ["Yes", "yes", "no", "two", "2", "cat"]]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(anns))
    vocab = AnswerVocab.build([path], min_count=2)
    assert vocab.answers == ["2", "yes"]  # normalised: "two" -> "2", "Yes" -> "yes"; "no" and "cat" seen once
    scores = vocab.soft_scores(["yes"] * 3 + ["Two"] + ["no"] * 6)
    assert scores.tolist() == pytest.approx([0.3, 0.9])


def test_malformed_files_name_the_file_and_field(tmp_path, tok):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1}]}))
    with pytest.raises(InputError, match=r"q.json: questions\[0\]: missing field\(s\) \['question'\]"):
        VQADataset(q, tmp_path, tok, eval_transform(32))
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 7, "question": "why?"}]}))
    with pytest.raises(InputError, match="no image for 1 image_id"):
        VQADataset(q, tmp_path, tok, eval_transform(32))
    bad = tmp_path / "n.json"
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}\n')
    with pytest.raises(InputError, match=r"n.json:1: label must be 'True' or 'False'"):
        NLVR2Dataset(bad, tmp_path, tok, eval_transform(32))


def test_nlvr2_and_captions_from_the_world(world, tok, tmp_path):
    out, _ = world
    ds = NLVR2Dataset(out / "nlvr2" / "dev.json", out / "nlvr2" / "images", tok, eval_transform(32))
    batch = ds.collate([ds[i] for i in range(len(ds))])
    assert batch["images_left"].shape == (6, 3, 32, 32) and batch["labels"].sum() == 3  # balanced
    caps = CaptionDataset(out / "coco" / "dataset_coco.json", out / "vqa" / "images", tok, eval_transform(32))
    assert len(caps) == 24 * 3
    test_images = CaptionDataset(out / "coco" / "dataset_coco.json", out / "vqa" / "images", tok, eval_transform(32),
                                 splits=("test",), per_image=True)
    assert len(test_images) == 8 and "text_ids" not in test_images[0]
    from pycocotools.coco import COCO

    gt = COCO(str(write_coco_gt(out / "coco" / "dataset_coco.json", "test", tmp_path / "gt.json")))
    assert len(gt.getImgIds()) == 8 and len(gt.getAnnIds()) == 24


def test_synthetic_world_is_balanced_and_deterministic(tmp_path):
    a = write_world(tmp_path / "a", n_train=60, n_val=20, n_test=4, n_pairs_train=20, n_pairs_dev=20, seed=1, size=32)
    b = write_world(tmp_path / "b", n_train=60, n_val=20, n_test=4, n_pairs_train=20, n_pairs_dev=20, seed=1, size=32)
    assert a == b
    assert (tmp_path / "a" / "vqa" / "v2_mscoco_val2014_annotations.json").read_bytes() == \
        (tmp_path / "b" / "vqa" / "v2_mscoco_val2014_annotations.json").read_bytes()
    anns = json.loads((tmp_path / "a" / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    yes_no = [x["multiple_choice_answer"] for x in anns if x["answer_type"] == "yes/no"]
    assert len(yes_no) == 60 and abs(yes_no.count("yes") - 30) <= 10
    assert {x["answer_type"] for x in anns} == {"yes/no", "number", "other"}
    assert a["nlvr2_train"]["true_fraction"] == 0.5


def test_easy_vqa_conversion(tmp_path, tok):
    pytest.importorskip("easy_vqa")
    res = subprocess.run([sys.executable, str(ROOT / "data" / "convert_easy_vqa.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["train"]["images"] == 4000 and summary["val"]["images"] == 1000
    vocab = AnswerVocab.build([tmp_path / "v2_mscoco_train2014_annotations.json"], min_count=1)
    assert len(vocab) == 13
    ds = VQADataset(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "images", tok,
                    eval_transform(64), tmp_path / "v2_mscoco_val2014_annotations.json", vocab)
    assert len(ds) == summary["val"]["questions"] and ds[0]["targets"].sum() == 1


def _indexed(urls, tok, *, world=1, accum=1, workers=0, epoch=0, batch_size=2, buffer=7, rank_range=None,
             monomodal=None, share=0.5):
    """Every rank's micro-batches of one epoch of the global stream, listed by global micro-batch number."""
    index = ShardIndex(urls)
    model = BEiT3Config(img_size=32, patch_size=8, max_text_len=24)
    data = PretrainDataConfig(shuffle_buffer=buffer, monomodal_share=share)
    by_chunk = {}
    for rank in rank_range or range(world):
        ranks = RankBatches(index, tok, data, model, batch_size=batch_size, seed=5, epoch=epoch, rank=rank,
                            world=world, accum=accum, monomodal=monomodal)
        for k, batch in enumerate(IndexedEpoch(ranks, workers)):
            by_chunk[ranks.chunk(k)] = batch
    return [by_chunk[c] for c in sorted(by_chunk)]


def test_shard_index_reads_the_samples_webdataset_reads(world, tok):
    out, _ = world
    for url in sorted(str(p) for p in (out / "shards").glob("*.tar")):
        ours = [read_sample(url, int(o), int(n)) for o, n in index_shard(url)]
        theirs = list(wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil"))
        assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
        assert [s["txt"] for s in ours] == [s["txt"] for s in theirs]
        assert all(np.array_equal(np.asarray(a["png"].convert("RGB")), np.asarray(b["png"])) for a, b in
                   zip(ours, theirs, strict=True))


def test_global_stream_is_the_same_at_any_world_size_worker_count_and_accumulation(world, tok):
    """Step s's global batch (G = 8 samples, micro-batches of 2) is the same samples, in the same micro-batches,
    with the same crops and masks, at 1 process x 4 accumulation steps, 2 x 2 with 2 DataLoader workers, and 4 x 1;
    an epoch is one pass without repeats; another epoch is another order; starting at micro-batch k skips reading."""
    out, _ = world
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    one = _indexed(urls, tok, accum=4)
    n = sum(int(v) for v in ShardIndex(urls).counts)
    keys = [k for b in one for k in b["keys"]]
    assert len(keys) == n // 8 * 8 and len(set(keys)) == len(keys)
    for other in (_indexed(urls, tok, world=2, accum=2, workers=2), _indexed(urls, tok, world=4)):
        assert len(other) == len(one)
        for a, b in zip(one, other, strict=True):
            assert a["keys"] == b["keys"]
            for field in ("images", "masked_ids", "mlm_labels", "patch_mask"):
                assert torch.equal(a[field], b[field]), field
    assert [b["keys"] for b in _indexed(urls, tok, accum=4, epoch=1)] != [b["keys"] for b in one]
    index = ShardIndex(urls)
    ranks = RankBatches(index, tok, PretrainDataConfig(shuffle_buffer=7), BEiT3Config(img_size=32, patch_size=8,
                        max_text_len=24), batch_size=2, seed=5, epoch=0, rank=1, world=2, accum=2)
    tail = list(IndexedEpoch(ranks, 0).starting_at(3))
    assert [b["keys"] for b in tail] == [b["keys"] for b in list(IndexedEpoch(ranks, 0))[3:]]


def test_monomodal_sources_fill_their_share_of_the_mim_and_mlm_passes_at_any_world_size(world, tok, tmp_path):
    """Image-only and text-only shards beside the pairs: the last share x batch_size of every micro-batch's MIM
    images and MLM texts come from them, in each source's own order, one pass without repeats before any sample
    comes again; the pairs' own samples fill the rest and keep the VLM pass; the same micro-batches at 1 process x
    4 accumulation steps, 2 x 2 with 2 workers, and in the next epoch the sources go on where they were."""
    out, _ = world
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    image_dir, text_dir = monomodal_shards(out, tmp_path)
    sources = {"image": ShardIndex(sorted(str(p) for p in image_dir.glob("*.tar")), key="pretrain_data.image_shards"),
               "text": ShardIndex(sorted(str(p) for p in text_dir.glob("*.tar")), key="pretrain_data.text_shards")}
    one = _indexed(urls, tok, accum=4, batch_size=4, monomodal=sources, share=0.5)
    for b in one:  # 2 pair samples then 2 monomodal ones; the VLM pass keeps all 4 pairs
        assert b["mim_keys"][:2] == b["mlm_keys"][:2] == b["keys"][:2] and len(b["keys"]) == 4
        assert all(k.startswith("img-") for k in b["mim_keys"][2:])
        assert all(k.startswith("txt-") for k in b["mlm_keys"][2:])
        assert torch.equal(b["mim_images"][:2], b["images"][:2])
        for i in range(2):  # the same masked text, each batch padded to its own longest
            assert torch.equal(b["mlm_text_ids"][i][~b["mlm_text_padding"][i]], b["masked_ids"][i][~b["text_padding"][i]])
        assert b["mim_images"].shape == b["images"].shape and b["mlm_text_ids"].shape == b["mlm_text_labels"].shape
        assert (b["mlm_text_labels"][b["mlm_text_padding"]] == -100).all()
    for part, field in (("image", "mim_keys"), ("text", "mlm_keys")):
        drawn = [k for b in one for k in b[field][2:]]
        size = int(sources[part].counts.sum())
        assert len(set(drawn[:size])) == min(size, len(drawn))  # a whole pass before any repeat
    # the monomodal texts are masked for MLM at its rate, the pairs' images and texts unchanged by the mix
    labels = torch.cat([b["mlm_text_labels"][2:][~b["mlm_text_padding"][2:]] for b in one])
    assert 0.05 < (labels != -100).float().mean().item() < 0.3
    plain = _indexed(urls, tok, accum=4, batch_size=4)
    for a, b in zip(one, plain, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and torch.equal(a["vlm_ids"], b["vlm_ids"])
    other = _indexed(urls, tok, world=2, accum=2, workers=2, batch_size=4, monomodal=sources, share=0.5)
    for a, b in zip(one, other, strict=True):
        assert a["mim_keys"] == b["mim_keys"] and a["mlm_keys"] == b["mlm_keys"]
        for field in ("mim_images", "mim_patch_mask", "mlm_text_ids", "mlm_text_labels"):
            assert torch.equal(a[field], b[field]), field
    # the next epoch's micro-batch g continues the sources at their position g (counted over epochs)
    nxt = _indexed(urls, tok, accum=4, batch_size=4, epoch=1, monomodal=sources, share=0.5)
    longer = [k for b in one + nxt for k in b["mim_keys"][2:]]
    size = int(sources["image"].counts.sum())
    assert len(set(longer[:size])) == min(size, len(longer))
    # share 1: the MIM and MLM passes are all monomodal
    full = _indexed(urls, tok, accum=4, batch_size=4, monomodal=sources, share=1.0)
    assert all(k.startswith("img-") for b in full for k in b["mim_keys"])


def test_pretraining_passes_take_the_monomodal_inputs_where_the_batch_has_them():
    """MLM reads mlm_text_*, MIM reads mim_*, VLM the pairs, when a batch has them; without, all read the pairs."""
    from types import SimpleNamespace

    from mm_moe.config import ObjectivesConfig
    from mm_moe.engine.tasks.pretrain import pretrain_loss

    calls = []

    def model(stats=False, **inputs):
        calls.append(inputs)
        return SimpleNamespace(losses={"loss": torch.tensor(1.0)}, aux_loss=0.0, stats={}, logits=None)

    pairs = {k: torch.zeros(1) for k in ("masked_ids", "text_padding", "mlm_labels", "images", "patch_mask",
                                         "vlm_ids", "vlm_labels")}
    mono = {k: torch.ones(1) for k in ("mlm_text_ids", "mlm_text_padding", "mlm_text_labels", "mim_images",
                                       "mim_patch_mask")}
    loss = pretrain_loss(ObjectivesConfig())
    loss(model, pairs | mono)
    mlm, mim, vlm = calls
    assert mlm["text_ids"] is mono["mlm_text_ids"] and mlm["text_padding"] is mono["mlm_text_padding"]
    assert mlm["mlm_labels"] is mono["mlm_text_labels"]
    assert mim["images"] is mono["mim_images"] and mim["patch_mask"] is mono["mim_patch_mask"]
    assert vlm["images"] is pairs["images"] and vlm["text_ids"] is pairs["vlm_ids"]
    calls.clear()
    loss(model, pairs)
    assert calls[0]["text_ids"] is pairs["masked_ids"] and calls[1]["images"] is pairs["images"]


def test_monomodal_sources_need_local_shards_and_name_their_key(world, tok, tmp_path):
    """Streamed pair shards cannot take monomodal sources, which are read by position; a source folder without
    shards is an error naming its own key."""
    from mm_moe.config import RunConfig
    from mm_moe.config_files import load_config
    from mm_moe.engine.tasks import pretrain
    from mm_moe.errors import ConfigError

    out, _ = world
    image_dir, _ = monomodal_shards(out, tmp_path)
    recipe = str(ROOT / "configs" / "pretrain_demo.yaml")
    streamed = load_config(RunConfig, recipe, [f"pretrain_data.shards=pipe:cat {out}/shards/000000.tar",
                                               f"pretrain_data.image_shards={image_dir}"])
    with pytest.raises(ConfigError, match="image_shards / text_shards: only beside local pair shards"):
        pretrain.build(streamed, tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = load_config(RunConfig, recipe, [f"pretrain_data.shards={out / 'shards'}",
                                              f"pretrain_data.text_shards={empty}"])
    with pytest.raises(InputError, match=r"^pretrain_data.text_shards=.*no .tar shards"):
        pretrain.build(missing, tok)
    both = load_config(RunConfig, recipe, [f"pretrain_data.shards={out / 'shards'}", "model.img_size=32",
                                           f"pretrain_data.image_shards={image_dir}", "train.batch_size=4"])
    batch = next(iter(pretrain.build(both, tok).loader(0)))
    assert [k.startswith("img-") for k in batch["mim_keys"]] == [False, False, True, True] and "mlm_keys" not in batch


def test_global_stream_skips_and_counts_broken_samples(world, tok, tmp_path):
    """A corrupt image, a sample without caption and a tar cut short: skipped and counted, the rest read; the index
    is cached beside the shards and reused."""
    out, summary = world
    shard_dir = tmp_path / "shards"
    shutil.copytree(out / "shards", shard_dir)
    _add_broken_shard(shard_dir)
    good_in_truncated, partial_ok = _add_truncated_shard(shard_dir, sorted((out / "shards").glob("*.tar"))[0])
    urls = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    batches = _indexed(urls, tok, batch_size=1, buffer=1000)
    indexed = sum(int(v) for v in ShardIndex(urls).counts)
    assert len(list((shard_dir / INDEX_DIR).glob("*.npy"))) == len(urls)
    read = sum(len(b.get("keys", [])) for b in batches)
    skipped = sum(b["num_skipped"] for b in batches)
    assert read + skipped == indexed
    assert skipped == 2 + (not partial_ok)  # the corrupt image, the missing caption (+ a partial last sample)
    assert read == summary["shards"]["pairs"] + 2 + good_in_truncated + partial_ok


def test_mlm_and_vlm_passes_mask_their_own_fractions_independently(tok):
    """BEiT-3's masking: 15% of the text for the text-only pass, 50% for the image-text pass, drawn independently
    (P(both) = P(MLM) x P(VLM)); seeded by the sample alone, so the same sample gets the same masks again."""
    prepare = PretrainSample(tok, PretrainDataConfig(), BEiT3Config(img_size=32, patch_size=8, max_text_len=512), seed=0)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    caption = " ".join(["a red circle at the top left and a blue square"] * 20)
    chosen = {"mlm": [], "vlm": []}
    for k in range(60):
        s = prepare.prepare({"__key__": f"k{k}", "__url__": "s.tar", "png": image, "txt": caption})
        for p in chosen:
            chosen[p].append(torch.tensor(s[f"{p}_labels"][1:-1]) != -100)  # [CLS] and [SEP] are never chosen
        assert s["masked_ids"] != s["vlm_ids"]
    mlm, vlm = torch.cat(chosen["mlm"]).float(), torch.cat(chosen["vlm"]).float()
    n = mlm.numel()
    for got, want in ((mlm.mean(), 0.15), (vlm.mean(), 0.5), ((mlm * vlm).mean(), 0.075)):
        assert abs(got.item() - want) < 4 * (want * (1 - want) / n) ** 0.5, (got.item(), want, n)
    again = prepare.prepare({"__key__": "k0", "__url__": "s.tar", "png": image, "txt": caption})
    assert (torch.tensor(again["vlm_labels"][1:-1]) != -100).equal(chosen["vlm"][0])
