"""The evaluation commands from a fine-tuned run directory, on the synthetic world: NLVR2 predictions in the
official CSV scored like lil-lab/nlvr metrics.py; VQA scored by the current vqaEval.py or its 2017 revision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_scripts import script
from tiny import TINY

from mm_moe.data.nlvr2 import read_nlvr2
from mm_moe.eval import nlvr2_metrics, read_predictions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_eval_nlvr2_predicts_writes_the_official_csv_and_scores(tmp_path, world, capsys):
    run = tmp_path / "nlvr2"
    assert script("train_mm.py").main(
        ["finetune", "nlvr2", "--config", str(ROOT / "configs/finetune_nlvr2_demo.yaml"), *TINY, f"run_dir={run}",
         f"data.nlvr2_train={world}/nlvr2/train.json", f"data.nlvr2_images={world}/nlvr2/images", "data.nlvr2_dev=''"]) == 0
    capsys.readouterr()
    dev, csv = world / "nlvr2" / "dev.json", tmp_path / "dev.csv"
    evaluate = script("eval_nlvr2.py").main
    assert evaluate(["--ckpt", str(run), "--data", str(dev), "--images", str(world / "nlvr2" / "images"),
                     "--out", str(csv)]) == 0
    scored = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    rows = read_nlvr2(dev)
    lines = csv.read_text().splitlines()
    assert sorted(line.split(",")[0] for line in lines) == sorted(r["identifier"] for r in rows)
    assert all(line.split(",")[1] in ("True", "False") for line in lines)
    assert scored == nlvr2_metrics(rows, read_predictions(csv))
    assert evaluate(["--results", str(csv), "--data", str(dev)]) == 0  # scoring the file alone: the same figures
    assert json.loads(capsys.readouterr().out) == scored
    csv.write_text("\n".join(lines[:-1]) + "\n")
    assert evaluate(["--results", str(csv), "--data", str(dev)]) == 1
    assert f"Some predictions are missing! Got {len(rows) - 1} predictions but expected {len(rows)}" in \
        capsys.readouterr().err


def test_eval_vqa_current_and_legacy_revisions(tmp_path, capsys):
    """Ten "yes" and a prediction "Yes": the current vqaEval.py normalises nothing when the humans agree (0), the
    2017 revision always normalised the prediction (100)."""
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "question_type": "is the", "answer_type": "yes/no", "answers": answers}]}))
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}))
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": 1, "answer": "Yes"}]))
    args = ["--results", str(tmp_path / "r.json"), "--questions", str(tmp_path / "q.json"), "--annotations",
            str(tmp_path / "a.json")]
    evaluate = script("eval_vqa.py").main
    assert evaluate(args) == 0 and json.loads(capsys.readouterr().out)["overall"] == 0.0
    assert evaluate([*args, "--legacy-2017"]) == 0 and json.loads(capsys.readouterr().out)["overall"] == 100.0


def vqa_args(world: Path, run: Path, *extra: str) -> list[str]:
    v = world / "vqa"
    return ["finetune", "vqa", "--config", str(ROOT / "configs/finetune_vqa_demo.yaml"), *TINY, f"run_dir={run}",
            f"data.vqa_train_questions={v}/v2_OpenEnded_mscoco_train2014_questions.json",
            f"data.vqa_train_annotations={v}/v2_mscoco_train2014_annotations.json", f"data.vqa_images={v}/images",
            f"data.vqa_val_questions={v}/v2_OpenEnded_mscoco_val2014_questions.json",
            f"data.vqa_val_annotations={v}/v2_mscoco_val2014_annotations.json", *extra]


@pytest.mark.slow
def test_periodic_validation_keeps_the_best_checkpoint(tmp_path, world, capsys):
    run = tmp_path / "vqa"
    train = script("train_mm.py").main
    assert train(vqa_args(world, run, "train.steps=4", "train.eval_every=1", "optim.lr=3e-3", "optim.warmup_steps=1")) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["vqa_val_accuracy"] for r in records if "vqa_val_accuracy" in r}
    assert sorted(scores) == [1, 2, 3, 4]
    best_step = max(scores, key=lambda s: (scores[s], -s))  # the first step reaching the maximum
    kept = torch.load(run / "best" / "trainer.pt", weights_only=True)
    assert kept == {"step": best_step, "metric": "vqa_val_accuracy", "value": scores[best_step], "world_size": 1}
    report = json.loads((run / "eval.json").read_text())
    assert report["vqa_val_accuracy"] == scores[4] and report["best"] == {"vqa_val_accuracy": scores[best_step]}
    # the eval command on best/ reproduces the best score; --init accepts best/
    v = world / "vqa"
    capsys.readouterr()
    assert script("eval_vqa.py").main(["--ckpt", str(run / "best"), "--images", str(v / "images"), "--out",
                                       str(tmp_path / "r.json"), "--questions",
                                       str(v / "v2_OpenEnded_mscoco_val2014_questions.json"), "--annotations",
                                       str(v / "v2_mscoco_val2014_annotations.json")]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["overall"] == scores[best_step]
    assert train(vqa_args(world, tmp_path / "again", "--init", str(run / "best"), "train.steps=1")) == 0


@pytest.mark.slow
def test_caption_fine_tuning_is_scored_with_the_coco_tools(tmp_path, world, capsys):
    run = tmp_path / "caption"
    assert script("train_mm.py").main(
        ["finetune", "caption", "--config", str(ROOT / "configs/finetune_caption_demo.yaml"), *TINY, f"run_dir={run}",
         f"data.karpathy={world}/coco/dataset_coco.json", f"data.coco_images={world}/vqa/images",
         "train.eval_every=1", "data.caption_beam=2", "data.caption_val_meteor=true"]) == 0
    report = json.loads((run / "eval.json").read_text())
    for metric in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0 <= report[f"caption_val_{metric}"] <= 10, metric
    results = json.loads((run / "caption_val_results.json").read_text())
    assert {r["image_id"] for r in results} == {im["cocoid"] for im in json.loads(
        (world / "coco" / "dataset_coco.json").read_text())["images"] if im["split"] == "val"}
    assert (run / "best" / "model.safetensors").is_file()
    # the eval command: caption the split from the run, write the server format, score it; scoring the file alone
    # gives the same numbers, which equal the validation's on the same split
    evaluate = script("eval_caption.py").main
    karpathy = ["--karpathy", str(world / "coco" / "dataset_coco.json"), "--split", "val"]
    capsys.readouterr()
    assert evaluate(["--ckpt", str(run), "--images", str(world / "vqa" / "images"), "--beam", "2",
                     "--out", str(tmp_path / "caps.json"), *karpathy]) == 0
    out = capsys.readouterr().out
    scored = json.loads(out[out.index('{\n  "images_scored"'):])  # pycocoevalcap prints dicts before it
    assert scored["images_scored"] == scored["images_in_split"] == len(results)
    assert {k: scored[k] for k in ("CIDEr", "BLEU-4")} == {k: report[f"caption_val_{k}"] for k in ("CIDEr", "BLEU-4")}
    assert evaluate(["--results", str(tmp_path / "caps.json"), *karpathy]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index('{\n  "images_scored"'):]) == scored
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": "x", "caption": "a"}]))
    assert evaluate(["--results", str(tmp_path / "bad.json"), *karpathy]) == 1
    assert "results[0]: expected {'image_id': int, 'caption': string}" in capsys.readouterr().err
