"""Bad input through the CLIs users run: one line naming the file / field / key, what was expected and what was
given; no traceback, a non-zero exit, nothing half-written. Skipped samples are logged with shard, key and cause."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from cli_scripts import script
from PIL import Image
from safetensors.torch import load_file

from mm_moe.config import BEiT3Config, ConfigError, InputError, PretrainDataConfig, RunConfig, load_config
from mm_moe.data import load_tokenizer, write_world
from mm_moe.data.shards import SkipCounter, pretrain_loader, shard_urls
from mm_moe.engine import DistInfo, Task, Trainer
from mm_moe.engine.checkpoint import init_encoder, save_checkpoint
from mm_moe.model import BEiT3ForPretraining, BEiT3ForVQA

ROOT = Path(__file__).resolve().parents[1]



train_mm, eval_vqa = script("train_mm.py"), script("eval_vqa.py")
TINY = ["model.img_size=32", "model.d_model=32", "model.depth=2", "model.heads=2", "model.ffn.hidden=64",
        "model.moe.hidden=16", "model.moe.num_experts=4", "train.batch_size=4", "train.steps=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, n_train=12, n_val=2, n_test=2, n_pairs_train=2, n_pairs_dev=2, size=32, shard_count=12)
    return out


def error_of(main, argv: list[str], capsys) -> str:
    """The one-line error a CLI prints (exit code 1, no traceback)."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


def pretrain(args: list[str], run_dir: Path) -> list[str]:
    return ["pretrain", "--config", str(ROOT / "configs/pretrain_demo.yaml"), *TINY, f"run_dir={run_dir}", *args]


def vqa(world: Path, args: list[str], run_dir: Path) -> list[str]:
    return ["finetune", "vqa", "--config", str(ROOT / "configs/finetune_vqa_demo.yaml"), *TINY, f"run_dir={run_dir}",
            f"data.vqa_train_questions={world}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
            f"data.vqa_train_annotations={world}/vqa/v2_mscoco_train2014_annotations.json",
            f"data.vqa_images={world}/vqa/images", "data.vqa_val_questions=''", *args]


# --- pretraining data ---------------------------------------------------------------------------------------
def test_missing_shards_and_a_typo_in_a_brace_pattern(tmp_path, capsys, world):
    line = error_of(train_mm.main, pretrain([f"pretrain_data.shards={world}/shards/train-{{000000..000003}}.tarr"],
                                             tmp_path / "r"), capsys)
    assert "4 of 4 shard(s) do not exist" in line and "train-000000.tarr" in line
    assert not (tmp_path / "r").exists()  # nothing written before the error


def test_shards_that_are_not_tar_archives(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.tar").write_text("not a tar")
    line = error_of(train_mm.main, pretrain([f"pretrain_data.shards={tmp_path / 's'}"], tmp_path / "r"), capsys)
    assert "no shard is a tar archive" in line and "a.tar" in line


def test_fewer_shards_than_readers_is_an_error_unless_resampled(tmp_path, capsys, world):
    one = f"pretrain_data.shards={world}/shards/train-000000.tar"
    line = error_of(train_mm.main, pretrain([one, "train.num_workers=2"], tmp_path / "r"), capsys)
    assert "1 shard(s) for 2 readers" in line and "pretrain_data.epoch_batches" in line


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_without_a_readable_sample_stops_the_run(tmp_path, capsys, workers):
    (tmp_path / "s").mkdir()
    for shard in ("a", "b"):
        _tar(tmp_path / "s" / f"{shard}.tar", [(f"k{i}.txt", b"a caption without its image.") for i in range(3)])
    line = error_of(train_mm.main, pretrain([f"pretrain_data.shards={tmp_path / 's'}", f"train.num_workers={workers}"],
                                            tmp_path / "r"), capsys)
    assert f"pretrain_data.shards={tmp_path / 's'}/a.tar,{tmp_path / 's'}/b.tar: no sample could be read" in line
    assert f"first failures: {tmp_path / 's'}/" in line and ".tar: sample 'k" in line and "no image (jpg" in line


def test_expert_parallelism_needs_ddp(tmp_path):
    cfg = load_config(RunConfig, ROOT / "configs/pretrain_demo.yaml", [*TINY, "train.distributed=fsdp2",
                                                                        "train.expert_parallel=true", f"run_dir={tmp_path}"])
    model = BEiT3ForPretraining(cfg.model)
    with pytest.raises(ConfigError, match=re.escape("train.expert_parallel: needs train.distributed=ddp, got 'fsdp2'")):
        Trainer(Task(model, lambda epoch: [], lambda m, b: None, lambda b: 0), cfg, DistInfo(0, 2))


def test_resampling_unreadable_data_stops_instead_of_looping():
    skips = SkipCounter("s.tar", patience=3)
    skips(ValueError("a"))
    skips(ValueError("b"))
    with pytest.raises(InputError, match="3 samples in a row could not be read; the last: ValueError: c"):
        skips(ValueError("c"))


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_skipped_samples_are_logged_with_shard_key_and_cause(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # a 32 x 32 image is then a decompression bomb (> 2x)
    shard = tmp_path / "s.tar"
    _tar(shard, [("good.png", _png(12)), ("good.txt", b"a green square."),
                 ("corrupt.png", b"\x89PNG not really"), ("corrupt.txt", b"broken."),
                 ("badtext.png", _png(12)), ("badtext.txt", b"\xff\xfe caption"),
                 ("bomb.png", _png(32)), ("bomb.txt", b"too many pixels.")])
    model = BEiT3Config(img_size=16, patch_size=8, max_text_len=16)
    with caplog.at_level(logging.WARNING):
        batches = list(pretrain_loader([str(shard)], load_tokenizer(), PretrainDataConfig(shuffle_buffer=1), model,
                                       batch_size=4))
    assert [b["keys"] for b in batches] == [["good"]] and batches[0]["num_skipped"] == 3
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    for key, field, cause in [("corrupt", "png", "UnidentifiedImageError"), ("badtext", "txt", "UnicodeDecodeError"),
                              ("bomb", "png", "DecompressionBombError")]:
        assert any(str(shard) in x and f"sample {key!r}, field {field!r}: {cause}" in x for x in lines), (key, lines)


def test_the_skip_log_is_rate_limited(caplog):
    skips = SkipCounter("s.tar")
    with caplog.at_level(logging.WARNING):
        for i in range(2500):
            skips(ValueError(f"bad {i}"))
    assert len(caplog.records) == 10 + 2  # the first ten, then every 1000th with the running count
    assert "(2000 so far in this process)" in caplog.records[-1].getMessage()


# --- --resume / --init / fine-tuning data ---------------------------------------------------------------------
def test_resume_needs_a_checkpoint_and_auto_resume_starts_without_one(tmp_path, capsys, world):
    shards = f"pretrain_data.shards={world}/shards"
    line = error_of(train_mm.main, pretrain([shards, "--resume"], tmp_path / "typo"), capsys)
    assert "--resume: run_dir=" in line and "typo has no step-* checkpoint" in line
    assert train_mm.main(pretrain([shards, "--auto-resume"], tmp_path / "r")) == 0
    assert (tmp_path / "r" / "step-00000002").is_dir()
    line = error_of(train_mm.main, pretrain([shards], tmp_path / "r"), capsys)
    assert "already has checkpoints: pass --resume" in line


@pytest.fixture(scope="module")
def depth_three(tmp_path_factory) -> Path:
    """A checkpoint of a 3-block encoder."""
    cfg = load_config(BEiT3Config, ROOT / "configs/model/tiny.yaml",
                      [o.removeprefix("model.") for o in TINY if o.startswith("model.")] + ["depth=3"])
    out = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(out, 1, BEiT3ForPretraining(cfg), {})


def test_init_from_a_checkpoint_that_does_not_fit_lists_the_keys(tmp_path, capsys, world, depth_three):
    line = error_of(train_mm.main, vqa(world, ["--init", str(depth_three)], tmp_path / "r"), capsys)
    assert "does not fit the model's encoder" in line and "unexpected: encoder.blocks.2." in line
    assert "--init-partial" in line
    line = error_of(train_mm.main, vqa(world, ["--init", str(depth_three), "model.depth=4"], tmp_path / "r"), capsys)
    assert "missing: encoder.blocks.3." in line
    line = error_of(train_mm.main, vqa(world, ["--init", str(depth_three), "model.d_model=64", "model.depth=3"],
                                       tmp_path / "r"), capsys)
    assert "mismatched: " in line and "(32,) vs model (64,)" in line


def test_init_partial_loads_what_fits_and_reports_the_rest(tmp_path, capsys, world, depth_three):
    cfg = load_config(BEiT3Config, ROOT / "configs/model/tiny.yaml",
                      [o.removeprefix("model.") for o in TINY if o.startswith("model.")])
    model = BEiT3ForVQA(cfg, 3)
    report = init_encoder(model, depth_three, partial=True)
    assert report["unexpected"] and all(k.startswith("encoder.blocks.2.") for k in report["unexpected"])
    assert not report["missing"] and not report["mismatched"]
    saved = load_file(str(depth_three / "model.safetensors"))
    for name, value in model.beit3.state_dict().items():
        assert torch.equal(value, saved[f"beit3.{name}"]), name
    assert train_mm.main(vqa(world, ["--init", str(depth_three), "--init-partial"], tmp_path / "r")) == 0
    assert "not loaded (--init-partial), unexpected: encoder.blocks.2." in capsys.readouterr().err


def test_init_with_a_file_that_is_not_a_checkpoint(tmp_path, capsys, world):
    (tmp_path / "x.pth").write_text("junk")
    line = error_of(train_mm.main, vqa(world, ["--init", str(tmp_path / "x.pth")], tmp_path / "r"), capsys)
    assert "x.pth: not a readable torch checkpoint" in line
    line = error_of(train_mm.main, vqa(world, ["--init", str(tmp_path / "nothing")], tmp_path / "r"), capsys)
    assert "nothing: neither a checkpoint" in line


def test_too_few_samples_for_a_batch(tmp_path, capsys, world):
    line = error_of(train_mm.main, vqa(world, ["train.batch_size=100000"], tmp_path / "r"), capsys)
    assert "data.vqa_train_questions=" in line and "make no full batch of train.batch_size=100000" in line


def test_tensorboard_missing_names_the_extra(tmp_path, capsys, world, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    line = error_of(train_mm.main, pretrain([f"pretrain_data.shards={world}/shards", "train.tensorboard=true"],
                                            tmp_path / "r"), capsys)
    assert "train.tensorboard=true needs the tensorboard package" in line and "mm_moe[tensorboard]" in line


# --- eval_vqa.py ------------------------------------------------------------------------------------------------
def _vqa_files(tmp_path: Path, ann: dict | None = None, questions: list | None = None) -> tuple[Path, Path]:
    a = {"question_id": 1, "question_type": "what", "answer_type": "other", "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_id": i} for i in range(1, 11)]}
    a.update(ann or {})
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [a]}))
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions or [{"question_id": 1, "image_id": 5,
                                                                            "question": "what colour?"}]}))
    return tmp_path / "a.json", tmp_path / "q.json"


@pytest.mark.parametrize("ann,expected", [
    ({"answers": [{"answer": 3}]}, "annotations[0] (question_id 1): answers[0]: expected {'answer': string}, got {'answer': 3}"),
    ({"answers": [{"answer": None}]}, "answers[0]: expected {'answer': string}, got {'answer': None}"),
    ({"answers": [{"answer_id": 1}]}, "answers[0]: expected {'answer': string}, got {'answer_id': 1}"),
    ({"answers": []}, "'answers' must be a non-empty list, got []"),
    ({"answer_type": None}, "'answer_type' must be a string, got None"),
])
def test_eval_vqa_malformed_annotations(tmp_path, capsys, ann, expected):
    a, q = _vqa_files(tmp_path, ann)
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": 1, "answer": "red"}]))
    line = error_of(eval_vqa.main, ["--results", str(tmp_path / "r.json"), "--questions", str(q), "--annotations", str(a)],
                    capsys)
    assert str(a) in line and expected in line


@pytest.mark.parametrize("results,expected", [
    ('{"question_id": 1, "answer": "red"}', "r.json: expected a list of {'question_id', 'answer'} objects, got a dict"),
    ('[{"question_id": 1, "answer": "red"', "r.json: not valid JSON"),
    ('[{"question_id": 1, "answer": null}]', "r.json[0]: expected {'question_id': int, 'answer': string}"),
    ('[{"question_id": 2, "answer": "red"}]', "1 missing (e.g. [1]), 1 unknown (e.g. [2])"),
])
def test_eval_vqa_malformed_results(tmp_path, capsys, results, expected):
    a, q = _vqa_files(tmp_path)
    (tmp_path / "r.json").write_text(results)
    line = error_of(eval_vqa.main, ["--results", str(tmp_path / "r.json"), "--questions", str(q), "--annotations", str(a)],
                    capsys)
    assert expected in line


def test_eval_vqa_duplicated_question_ids(tmp_path, capsys):
    q1 = {"question_id": 1, "image_id": 5, "question": "what colour?"}
    a, q = _vqa_files(tmp_path, questions=[q1, q1])
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": 1, "answer": "red"}]))
    line = error_of(eval_vqa.main, ["--results", str(tmp_path / "r.json"), "--questions", str(q), "--annotations", str(a)],
                    capsys)
    assert "q.json: questions[1]: question_id 1 appears twice" in line


def test_eval_vqa_results_without_annotations_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_vqa.main(["--results", str(tmp_path / "r.json"), "--questions", str(tmp_path / "q.json")])
    assert exit_.value.code == 2 and "--results needs --annotations" in capsys.readouterr().err


# --- data/make_shards.py ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def make_shards():
    return script("data/make_shards.py").main


def _images(tmp_path: Path) -> Path:
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(images / "a.jpg")
    return images


@pytest.mark.parametrize("lines,expected", [
    (['{"image": "a.jpg", "caption": 7}'], "caps.jsonl:1: caption must be a string, got int 7"),
    (['{"image": "a.jpg", "caption": "red."}', '{"image": "a.jpg", "caption": '], "caps.jsonl:2: not valid JSON"),
    (['{"image": "../a.jpg", "caption": "red."}'], "caps.jsonl:1: image path '../a.jpg' leaves the image folder"),
    (['{"image": "a.jpg"}'], "caps.jsonl:1: a line needs 'image' and 'caption'"),
])
def test_make_shards_malformed_captions(tmp_path, capsys, make_shards, lines, expected):
    images = _images(tmp_path)
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    line = error_of(make_shards, ["--captions", str(tmp_path / "caps.jsonl"), "--images", str(images),
                                  "--out", str(tmp_path / "out")], capsys)
    assert expected in line
    assert not (tmp_path / "out").exists()  # nothing written


def test_make_shards_with_nothing_to_write_fails_and_reports_why(tmp_path, capsys, make_shards):
    images = _images(tmp_path)
    (tmp_path / "caps.jsonl").write_text('{"image": "a.jpg", "caption": "  "}\n{"image": "b.jpg", "caption": "x."}\n')
    line = error_of(make_shards, ["--captions", str(tmp_path / "caps.jsonl"), "--images", str(tmp_path / "wrong"),
                                  "--out", str(tmp_path / "out")], capsys)
    assert "--images" in line and "wrong: not a folder" in line
    line = error_of(make_shards, ["--captions", str(tmp_path / "caps.jsonl"), "--images", str(images),
                                  "--out", str(tmp_path / "out")], capsys)
    assert "no sample written (2 pairs read, 2 skipped)" in line
    assert not list((tmp_path / "out").glob("*.tar"))


def test_make_shards_skips_an_empty_caption_and_says_so(tmp_path, capsys, make_shards):
    images = _images(tmp_path)
    (tmp_path / "caps.jsonl").write_text('{"image": "a.jpg", "caption": ""}\n{"image": "a.jpg", "caption": "red."}\n')
    assert make_shards(["--captions", str(tmp_path / "caps.jsonl"), "--images", str(images), "--out",
                        str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "wrote 1 samples" in out.out and "empty caption" in out.err and "skipped 1 of 2 pairs" in out.err
    urls = shard_urls(tmp_path / "out")
    with tarfile.open(urls[0]) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.name.endswith(".txt")) == ["a_0.txt"]
