"""Bad input through the CLIs users run: one line naming the file / field / key, what was expected and what was
given; no traceback, a non-zero exit, nothing half-written. Skipped samples are logged with shard, key and cause."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from cli_scripts import script
from PIL import Image
from safetensors.torch import load_file
from tiny import TINY, TINY_MODEL

from mm_moe.config import BEiT3Config, PretrainDataConfig, RunConfig
from mm_moe.config_files import load_config
from mm_moe.data import load_tokenizer
from mm_moe.data.shards import SkipCounter, pretrain_loader, shard_urls
from mm_moe.data.stream import IndexedEpoch, RankBatches, ShardIndex
from mm_moe.engine import DistInfo, Task, Trainer
from mm_moe.engine.checkpoint import save_checkpoint
from mm_moe.engine.init_weights import init_encoder
from mm_moe.errors import ConfigError, InputError
from mm_moe.model import BEiT3ForPretraining, BEiT3ForVQA

ROOT = Path(__file__).resolve().parents[1]



train_mm, eval_vqa = script("train_mm.py"), script("eval_vqa.py")


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


def test_fewer_streamed_shards_than_readers_is_an_error_unless_resampled(tmp_path, capsys, world):
    """Remote shards are streamed, each reader its own: fewer shards than readers is an error. Local shards are read
    by global position (any reader takes any sample), where resampling has no place."""
    one = f"pretrain_data.shards=pipe:cat {world}/shards/train-000000.tar"
    line = error_of(train_mm.main, pretrain([one, "train.num_workers=2"], tmp_path / "r"), capsys)
    assert "1 shard(s) for 2 readers" in line and "pretrain_data.epoch_batches" in line
    local = f"pretrain_data.shards={world}/shards/train-000000.tar"
    line = error_of(train_mm.main, pretrain([local, "pretrain_data.epoch_batches=5"], tmp_path / "r"), capsys)
    assert "pretrain_data.epoch_batches: only for remote (streamed) shards" in line


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
    streamed = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same shard read by global position
        epoch = RankBatches(ShardIndex([str(shard)]), load_tokenizer(), PretrainDataConfig(shuffle_buffer=1), model,
                            batch_size=4, seed=0, epoch=0, rank=0, world=1, accum=1)
        indexed = list(IndexedEpoch(epoch, 0))
    assert [b["keys"] for b in indexed] == [["good"]] and indexed[0]["num_skipped"] == 3
    by_position = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    for lines in (streamed, by_position):
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
    cfg = load_config(BEiT3Config, ROOT / "configs/model/tiny.yaml", [o.removeprefix("model.") for o in TINY_MODEL] + ["depth=3"])
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
    cfg = load_config(BEiT3Config, ROOT / "configs/model/tiny.yaml", [o.removeprefix("model.") for o in TINY_MODEL])
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
    assert "no sample written (2 read, 2 skipped)" in line
    assert not list((tmp_path / "out").glob("*.tar"))


def test_make_shards_skips_an_empty_caption_and_says_so(tmp_path, capsys, make_shards):
    images = _images(tmp_path)
    (tmp_path / "caps.jsonl").write_text('{"image": "a.jpg", "caption": ""}\n{"image": "a.jpg", "caption": "red."}\n')
    assert make_shards(["--captions", str(tmp_path / "caps.jsonl"), "--images", str(images), "--out",
                        str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "wrote 1 samples" in out.out and "empty caption" in out.err and "skipped 1 of 2 samples" in out.err
    urls = shard_urls(tmp_path / "out")
    with tarfile.open(urls[0]) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.name.endswith(".txt")) == ["a_0.txt"]


# --- faults of files, folders and disks (through train_mm.py as users run it) ---------------------------------
class Payload:
    """A pickle that would run code when unpickled: creating the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _trained(world: Path, run: Path, *extra: str) -> Path:
    """A 2-step pretraining run with checkpoints at steps 1 and 2."""
    assert train_mm.main(pretrain([f"pretrain_data.shards={world}/shards", "train.ckpt_every=1", *extra], run)) == 0
    return run


@pytest.mark.parametrize("target", ["dcp/.metadata", "trainer.pt"])
def test_an_untrusted_checkpoint_runs_no_code(tmp_path, capsys, world, target):
    """A pickle payload in the checkpoint, its manifest regenerated (as whoever ships the folder can): resuming
    refuses it in one line, and nothing runs."""
    import pickle

    from mm_moe.engine.checkpoint import write_manifest

    run = _trained(world, tmp_path / "r")
    marker = tmp_path / "pwned"
    ckpt = run / "step-00000002"
    (ckpt / target).write_bytes(pickle.dumps(Payload(marker)))
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)
    line = error_of(train_mm.main, pretrain([f"pretrain_data.shards={world}/shards", "train.steps=3", "--resume"], run),
                    capsys)
    assert str(ckpt / target.split("/")[0]) in line and not marker.exists()


def test_run_dir_that_is_not_ours_root_home_or_a_file(tmp_path, capsys, world):
    shards = f"pretrain_data.shards={world}/shards"
    for bad, expected in (("/", "is the filesystem root"), (str(Path.home()), "is a home folder")):
        assert expected in error_of(train_mm.main, pretrain([shards], Path(bad)), capsys)
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in error_of(train_mm.main, pretrain([shards], tmp_path / "file"), capsys)
    assert "file is a file" in error_of(train_mm.main, pretrain([shards], tmp_path / "file" / "run"), capsys)
    other = tmp_path / "papers"
    other.mkdir()
    (other / "draft.tex").write_text("mine")
    line = error_of(train_mm.main, pretrain([shards], other), capsys)
    assert "not empty and holds no mm-moe run (found draft.tex)" in line and "--overwrite" in line
    assert sorted(p.name for p in other.iterdir()) == ["draft.tex"]  # nothing written
    assert train_mm.main(pretrain([shards, "--overwrite"], other)) == 0
    assert (other / "draft.tex").read_text() == "mine" and (other / "step-00000002").is_dir()


def test_a_restart_without_a_checkpoint_moves_the_old_records_aside(tmp_path, capsys, world):
    run = tmp_path / "r"
    run.mkdir()
    (run / "mm_moe_run.json").write_text("{}")  # a run of ours, killed before its first checkpoint
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    assert train_mm.main(pretrain([f"pretrain_data.shards={world}/shards", "--auto-resume"], run)) == 0
    assert "earlier records are now" in capsys.readouterr().err
    assert json.loads((run / "metrics.jsonl.1").read_text())["loss"] == 9.0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps.count(1) == 1


def test_resume_with_another_config_names_the_keys_and_writes_nothing(tmp_path, capsys, world):
    run = _trained(world, tmp_path / "r")
    before = (run / "config.yaml").read_text()
    line = error_of(train_mm.main, pretrain([f"pretrain_data.shards={world}/shards", "model.depth=3", "optim.lr=0.5",
                                             "train.steps=3", "--resume"], run), capsys)
    assert "the config differs from step-00000002's in model.depth: 2 -> 3; optim.lr: 0.001 -> 0.5" in line
    assert (run / "config.yaml").read_text() == before
    assert train_mm.main(pretrain([f"pretrain_data.shards={world}/shards", "train.steps=3", "--resume"], run)) == 0


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog, world):
    run = _trained(world, tmp_path / "r")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a crash during the append
    with caplog.at_level(logging.WARNING):
        assert train_mm.main(pretrain([f"pretrain_data.shards={world}/shards", "train.steps=3", "--resume"], run)) == 0
    assert "last line is torn" in caplog.text
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_flipped_byte_in_a_checkpoint_is_refused_by_every_reader(tmp_path, capsys, world):
    from mm_moe.inference import VQAPredictor

    run = tmp_path / "vqa"
    assert train_mm.main(vqa(world, [], run)) == 0
    weights = run / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: same size, other values
    weights.write_bytes(bytes(data))
    line = error_of(train_mm.main, vqa(world, ["--init", str(run)], tmp_path / "init"), capsys)
    assert f"{weights}: sha256 differs from the manifest" in line and "--no-verify" in line
    images = f"{world}/vqa/images"
    questions = f"{world}/vqa/v2_OpenEnded_mscoco_val2014_questions.json"
    line = error_of(eval_vqa.main, ["--ckpt", str(run), "--questions", questions, "--images", images], capsys)
    assert "sha256 differs from the manifest" in line
    with pytest.raises(InputError, match="sha256 differs from the manifest"):
        VQAPredictor.from_pretrained(run)
    VQAPredictor.from_pretrained(run, verify=False)  # sizes still match: read anyway when asked
    assert eval_vqa.main(["--ckpt", str(run), "--questions", questions, "--images", images, "--no-verify",
                          "--out", str(tmp_path / "res.json")]) == 0


def _mount_tmpfs(where: Path, size_mb: int) -> bool:
    import subprocess

    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disks(tmp_path, monkeypatch):
    """Two small filesystems: 8 MB, too small for the first checkpoint, and 24 MB, too small for a second one. Real
    ones (tmpfs) where the tests may mount them (root); elsewhere plain folders whose writes the checkpoint code sees
    fail as on a full disk (ENOSPC from safetensors' writer, and disk_usage reporting what is left)."""
    import errno
    import subprocess

    from mm_moe.engine import checkpoint

    disks = {mb: tmp_path / f"disk{mb}" for mb in (8, 24)}
    mounted = [path for mb, path in disks.items() if _mount_tmpfs(path, mb)]
    if len(mounted) < len(disks):
        sizes = {path: mb * 2**20 for mb, path in disks.items()}

        def usage(path):
            root = next((p for p in disks.values() if p in (Path(path), *Path(path).parents)), None)
            if root is None:
                return real_usage(path)
            used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            return shutil._ntuple_diskusage(sizes[root], used, sizes[root] - used)

        def save_file(tensors, filename, *args, **kwargs):
            if usage(Path(filename).parent).free < sum(t.numel() * t.element_size() for t in tensors.values()):
                raise OSError(errno.ENOSPC, "No space left on device", filename)
            return real_save_file(tensors, filename, *args, **kwargs)

        real_save_file, real_usage = checkpoint.save_file, shutil.disk_usage
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)
        monkeypatch.setattr(checkpoint, "save_file", save_file)
    yield disks
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_full_disk_while_checkpointing(tmp_path, capsys, world, small_disks):
    """A checkpoint that does not fit stops the run with one line naming the folder and "no space left"; no
    partial .tmp folder stays; the previous checkpoint is intact and resumes."""
    shards = f"pretrain_data.shards={world}/shards"
    line = error_of(train_mm.main, pretrain([shards], small_disks[8] / "r"), capsys)
    assert f"{small_disks[8] / 'r'}: no space left on device while writing step-00000002" in line
    assert not list((small_disks[8] / "r").glob("*.tmp"))
    run = small_disks[24] / "r"
    line = error_of(train_mm.main, pretrain([shards, "train.ckpt_every=1", "train.keep_last=3"], run), capsys)
    assert f"{run}: no space left on device for step-00000002" in line and "step-00000001 is intact" in line
    shutil.copytree(run, tmp_path / "moved")  # room again: the run resumes from its intact checkpoint
    assert train_mm.main(pretrain([shards, "train.ckpt_every=1", "train.keep_last=3", "--resume"], tmp_path / "moved")) == 0
    assert (tmp_path / "moved" / "step-00000002").is_dir()


def _vqa_copy(world: Path, to: Path) -> Path:
    """A copy of the world's VQA files that a test may damage."""
    shutil.copytree(world / "vqa", to)
    return to


def _vqa_args(vqa_dir: Path, run: Path, *extra: str) -> list[str]:
    return ["finetune", "vqa", "--config", str(ROOT / "configs/finetune_vqa_demo.yaml"), *TINY, f"run_dir={run}",
            f"data.vqa_train_questions={vqa_dir}/v2_OpenEnded_mscoco_train2014_questions.json",
            f"data.vqa_train_annotations={vqa_dir}/v2_mscoco_train2014_annotations.json",
            f"data.vqa_val_questions={vqa_dir}/v2_OpenEnded_mscoco_val2014_questions.json",
            f"data.vqa_val_annotations={vqa_dir}/v2_mscoco_val2014_annotations.json",
            f"data.vqa_images={vqa_dir}/images", *extra]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def test_fine_tuning_skips_and_counts_unreadable_images_and_missing_questions(tmp_path, caplog, capsys, world):
    vqa_dir = _vqa_copy(world, tmp_path / "vqa")
    questions = vqa_dir / "v2_OpenEnded_mscoco_train2014_questions.json"
    data = json.loads(questions.read_text())
    data["questions"][0]["question"] = None
    questions.write_text(json.dumps(data))
    train_images = sorted((vqa_dir / "images" / "train2014").glob("*.png"))
    _truncate(train_images[1])
    epoch = len(data["questions"]) // 4  # steps of batch 4: every question is drawn once
    with caplog.at_level(logging.WARNING):
        assert train_mm.main(_vqa_args(vqa_dir, tmp_path / "r", f"train.steps={epoch}")) == 0
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(r.get("skipped_samples", 0) for r in records)
    assert skipped > 0
    assert "question is None, expected text" in caplog.text and f"{train_images[1]}: cannot read image" in caplog.text
    for image in train_images:  # nothing readable at all: one line
        _truncate(image)
    line = error_of(train_mm.main, _vqa_args(vqa_dir, tmp_path / "r2"), capsys)
    assert "yielded no batch" in line and "no readable sample" in line


def test_validation_files_are_checked_before_training_and_the_last_checkpoint_precedes_validation(tmp_path, capsys,
                                                                                                    world):
    vqa_dir = _vqa_copy(world, tmp_path / "vqa")
    line = error_of(train_mm.main, _vqa_args(vqa_dir, tmp_path / "r", f"data.vqa_val_annotations={vqa_dir}/typo.json"),
                    capsys)
    assert "typo.json: no such file" in line and not list((tmp_path / "r").glob("step-*"))
    for image in (vqa_dir / "images" / "val2014").glob("*.png"):
        _truncate(image)  # validation fails only when it runs, after the training
    line = error_of(train_mm.main, _vqa_args(vqa_dir, tmp_path / "r2"), capsys)
    assert "evaluation item(s) could not be read" in line
    assert (tmp_path / "r2" / "step-00000002" / "model.safetensors").is_file()  # the final weights are kept


def test_config_checks_across_fields(tmp_path, capsys, world):
    for override, expected in (("model.moe.heads=3", "moe.heads: expected a divisor of d_model=32"),
                               ("objectives.mlm=0 objectives.mim=0 objectives.vlm=0", "objectives: every weight is 0")):
        with pytest.raises(SystemExit) as exit_:
            train_mm.main(pretrain([f"pretrain_data.shards={world}/shards", *override.split()], tmp_path / "r"))
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def _png_file(path: Path, array) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_images_sixteen_bit_truncated_and_oversized(tmp_path, capsys):
    import numpy as np

    from mm_moe.data.common import load_image

    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    wide = load_image(_png_file(tmp_path / "16.png", ramp))
    assert wide.mode == "RGB" and np.array_equal(np.asarray(wide)[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert 0 < np.asarray(wide).mean() < 255  # scaled, not clipped to white
    bad = tmp_path / "cut.png"
    bad.write_bytes((tmp_path / "16.png").read_bytes()[:80])
    with pytest.raises(InputError, match=f"{bad}: cannot read image"):
        load_image(bad)
    bomb = tmp_path / "bomb.png"  # a header that claims 20000 x 20000 pixels (400 Mpixels)
    header = bytearray(_png_file(tmp_path / "small.png", np.zeros((4, 4), np.uint8)).read_bytes())
    header[16:24] = (20000).to_bytes(4, "big") * 2
    import zlib

    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")  # the IHDR's CRC
    bomb.write_bytes(bytes(header))
    with pytest.raises(InputError, match=f"{bomb}: image too large to decode"):
        load_image(bomb)


def test_predictor_inputs_are_checked(tmp_path, capsys, world):
    from mm_moe.inference import VQAPredictor, main

    run = tmp_path / "vqa"
    assert train_mm.main(vqa(world, [], run)) == 0
    predictor = VQAPredictor.from_pretrained(run)
    image = next((world / "vqa" / "images").rglob("*.png"))
    for question in (None, 3):
        with pytest.raises(InputError, match="expected text"):
            predictor.answer(image, question)
    with pytest.raises(InputError, match="top_k: expected an integer >= 1"):
        predictor.answer(image, "what colour?", top_k=0)
    cut = tmp_path / "cut.png"
    cut.write_bytes(image.read_bytes()[:70])
    assert f"{cut}: cannot read image" in error_of(main, ["vqa", str(run), "--image", str(cut), "--question", "what?"],
                                                     capsys)
    with pytest.raises(SystemExit) as exit_:
        main(["vqa", str(run), "--image", str(image), "--question", "what?", "--top-k", "-1"])
    assert exit_.value.code == 2 and "--top-k: expected an integer >= 1, got '-1'" in capsys.readouterr().err
